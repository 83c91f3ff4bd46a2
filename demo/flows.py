"""Flows the demo and the integration tests deploy; the worker loads them from this folder."""

import time

from prefect import flow, task


@flow(log_prints=True)
def quick(seconds: float = 1.0) -> None:
    """Sleeps a little, like a short batch job."""
    time.sleep(seconds)


@task(tags=["demo-tag"])
def tagged_step(seconds: float) -> None:
    time.sleep(seconds)


@flow
def tagged(seconds: float = 1.0) -> None:
    """Runs one task under the `demo-tag` tag, so a tag concurrency limit can hold it."""
    tagged_step(seconds)
