"""Shared fixtures: one local Ray for the session (num_cpus=2, dashboard on), a session storage dir."""
import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that starts trials."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_storage(tmp_path_factory):
    """A storage dir shared by the session's end-to-end tests (world, fitted teacher, caches)."""
    return tmp_path_factory.mktemp("storage")
