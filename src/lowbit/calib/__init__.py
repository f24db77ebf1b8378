"""Calibration text -> token windows -> captured block inputs."""
