"""Shared fixtures: one local Ray for the session (num_cpus=2, dashboard on), a session storage dir."""
import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that starts trials. Always a new instance of its own
    (address="local"): a cluster already running on the machine (a user's `ray start`, a benchmark) is never joined,
    and its CPUs never decide the tests' timing."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_storage(tmp_path_factory):
    """A storage dir shared by the session's end-to-end tests (world, fitted teacher, caches)."""
    return tmp_path_factory.mktemp("storage")


# ---- teacher side (tests/test_teacher.py) ---------------------------------------------------------------------------
TEACHER_TEST_STEPS = None   # the built-in recipe: the package's shipped teacher is used (no fit)


@pytest.fixture(scope="session")
def fitted_teacher(tmp_path_factory):
    """The built-in teacher for the session's small world (the shipped weights of the built-in recipe, copied into
    storage; fitting it is tests/test_miniature.py's business): {storage, root, checkpoint, steps}."""
    from distill.data.synth import ensure_world
    from distill.models.fit import ensure_teacher

    storage = tmp_path_factory.mktemp("teacher-storage")
    root = ensure_world(storage / "data" / "synth", seed=0, per_class=40, size=32)
    checkpoint = ensure_teacher(storage, root, seed=0)
    return {"storage": storage, "root": root, "checkpoint": checkpoint, "steps": TEACHER_TEST_STEPS}
