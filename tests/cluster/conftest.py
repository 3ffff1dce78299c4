import os

import pytest

from local_slurm import LocalSlurm, SlurmError, unmet_requirement


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A single-node Slurm cluster of this machine for the session. Without Slurm installed (or without
    root) the tests that need it are skipped, as GPU tests are without a GPU; under CI=true (.ci/run, which
    installs Slurm) they fail instead, so CI never passes by skipping them. A cluster that is installed
    but cannot start fails the tests."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    slurm_missing = unmet_requirement(cluster.env["PATH"])
    if slurm_missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the Slurm tests cannot run: {slurm_missing}", pytrace=False)
        pytest.skip(slurm_missing)
    try:
        cluster.start()
    except (SlurmError, OSError) as err:
        cluster.stop()
        pytest.fail(f"cannot start the local Slurm cluster: {err}", pytrace=False)
    yield cluster
    cluster.stop()
