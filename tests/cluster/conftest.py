import pytest

from local_slurm import LocalSlurm, SlurmError


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A single-node Slurm cluster of this machine for the session; a cluster that cannot start fails
    the tests that need it (CI installs Slurm, so it must start there)."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmError, OSError) as err:
        cluster.stop()
        pytest.fail(f"cannot start the local Slurm cluster: {err}", pytrace=False)
    yield cluster
    cluster.stop()
