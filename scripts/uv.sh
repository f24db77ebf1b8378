# Sourced by scripts/setup.sh and scripts/setup-peers.sh: `uv_install PYTHON ARGS...` installs pinned packages
# into the virtual env of PYTHON with uv (pinned below), which resolves, downloads and unpacks in parallel and
# links what it already unpacked once from its cache instead of unzipping it again (torch and, for the peers'
# torch, ~5 GB of CUDA libraries). uv itself is installed once with pip into the user's cache.
#
# uv does not read pip's configuration: the indexes, find-links, constraints and certificate pip is set up with
# (pip.conf, PIP_*) are handed to it, and it picks the best match across all indexes as pip does, so it installs
# the packages pip would install, from the same places.
UV_VERSION=0.13.9
UV_HOME="${LOWBIT_HOME:-$HOME/.cache/lowbit}/tools/uv-$UV_VERSION"

if [ ! -x "$UV_HOME/bin/uv" ]; then
    mkdir -p "$(dirname "$UV_HOME")"
    (
        flock 9  # setup.sh and setup-peers.sh run side by side in scripts/test.sh
        if [ ! -x "$UV_HOME/bin/uv" ]; then
            rm -rf "$UV_HOME.partial"
            "${PYTHON:-python3}" -m pip install -q --disable-pip-version-check --target "$UV_HOME.partial" "uv==$UV_VERSION"
            mv "$UV_HOME.partial" "$UV_HOME"
        fi
    ) 9>"$UV_HOME.lock"
fi
UV="$UV_HOME/bin/uv"

PIP_SETTINGS=$("${PYTHON:-python3}" -m pip config list 2>/dev/null || true)  # key='value' lines, environment first
export_from_pip() {  # export_from_pip UV_VARIABLE pip-setting: pip's value, unless the variable is set already
    local value
    [ -n "${!1:-}" ] && return
    value=$(sed -n "s/^[^.]*\.$2='\(.*\)'\$/\1/p" <<<"$PIP_SETTINGS" | head -n 1)
    if [ -n "$value" ]; then export "$1=$value"; fi
}
export_from_pip UV_INDEX_URL index-url
export_from_pip UV_EXTRA_INDEX_URL extra-index-url
export_from_pip UV_FIND_LINKS find-links
export_from_pip UV_CONSTRAINT constraint
export_from_pip SSL_CERT_FILE cert
export UV_INDEX_STRATEGY="${UV_INDEX_STRATEGY:-unsafe-best-match}"  # pip's rule: best version over all indexes

uv_install() {  # uv_install PYTHON ARGS...: first from uv's cache alone (no network: a warm cache installs in
    # seconds, and sdists built once are not rebuilt), else from the indexes
    local python=$1
    shift
    "$UV" pip install -q --python "$python" --offline "$@" 2>/dev/null || "$UV" pip install -q --python "$python" "$@"
}
