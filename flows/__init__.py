"""Prefect flows and the `msm4sr` CLI: wiring only, no logic."""

from flows import _env

_env.apply()
