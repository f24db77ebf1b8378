"""The block engine with blocks that take and return two streams (a diffusion transformer's joint blocks):
outputs routed back to the argument each feeds, None streams (SD3's last block), and the loss weighting that
makes each stream count by its relative error."""

import torch

from lowbit.calib.capture import BlockArgs, ReplayPlan
from lowbit.engine import BlockEngine


class Joint(torch.nn.Module):
    """Returns (encoder_hidden_states, hidden_states), as FLUX / SD3 blocks do; `drop` returns no text stream."""

    def __init__(self, drop=False):
        super().__init__()
        self.drop = drop

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return (None if self.drop else encoder_hidden_states * 10 + temb[:, None]), hidden_states * 2 + 1


def plan(n=3):
    gen = torch.Generator().manual_seed(0)
    return ReplayPlan(hidden=[torch.randn(1, 6, 4, generator=gen) for _ in range(n)],
                      blocks=[BlockArgs(sample={"temb": [torch.randn(1, 4, generator=gen) for _ in range(n)]}) for _ in range(2)],
                      streams={"encoder_hidden_states": [torch.randn(1, 3, 4, generator=gen) for _ in range(n)]},
                      outputs=("encoder_hidden_states", "hidden_states"))


def test_outputs_feed_the_arguments_they_name_at_any_batch_size():
    p = plan()
    for batch in (1, 2, 3):
        engine = BlockEngine(p, "cpu", "cpu", batch)
        stream = engine.propagate(Joint(), 0, engine.stream())
        for i in range(3):
            torch.testing.assert_close(stream.hidden[i], p.hidden[i] * 2 + 1)
            torch.testing.assert_close(stream.extra["encoder_hidden_states"][i], p.streams["encoder_hidden_states"][i] * 10 + p.blocks[0].sample["temb"][i][:, None])
        last = engine.propagate(Joint(drop=True), 1, stream)
        assert last.extra["encoder_hidden_states"] == [None] * 3
        torch.testing.assert_close(last.hidden[2], stream.hidden[2] * 2 + 1)


def test_weighted_joint_mse_is_the_count_weighted_relative_error_of_each_stream():
    p = plan()
    engine = BlockEngine(p, "cpu", "cpu", 3)
    fp = engine.propagate(Joint(), 0, engine.stream())
    targets = torch.cat(engine.joint(fp, 0))  # [3, 3*4 + 6*4], weights fixed from these
    enc, hid = torch.cat(fp.extra["encoder_hidden_states"]), torch.cat(fp.hidden)
    # a prediction off by 1% on the text stream and 2% on the image stream
    noisy = [enc * 1.01, hid * 1.02]
    pred = torch.cat([noisy[0].flatten(1) * engine.weights(0, [])[0], noisy[1].flatten(1) * engine.weights(0, [])[1]], dim=1)
    mse = torch.nn.functional.mse_loss(pred, targets).item()
    rel = lambda a, b: ((a - b).pow(2).mean() / b.pow(2).mean()).item()  # noqa: E731
    by_hand = (enc.numel() * rel(noisy[0], enc) + hid.numel() * rel(noisy[1], hid)) / (enc.numel() + hid.numel())
    assert abs(mse - by_hand) < 1e-9
    # the text stream is ~10x larger: unweighted, its 1% would outweigh the image stream's 2%
    assert rel(noisy[0], enc) < rel(noisy[1], hid) and (noisy[0] - enc).pow(2).sum() > (noisy[1] - hid).pow(2).sum()
    # call() applies the same weights to the block's own outputs
    torch.testing.assert_close(engine.call(Joint(), 0, engine.stream(), [0, 1, 2]), targets)
