"""Shared fixtures: small real data made once per session, and CLI runners."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    """Groups for `pytest -n 2 --dist loadgroup` (what `make test` runs): a file's tests stay on one worker,
    so its module fixtures are made once, and every test reading `mirrored_runs` shares one worker, so the
    one subprocess that runs all registered MirroredStrategy fits runs once."""
    for item in items:
        group = "mirrored_runs" if "mirrored_runs" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def data_home(tmp_path_factory):
    """A private VISLEARN_DATA so tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("vislearn_data")
    os.environ["VISLEARN_DATA"] = str(home)
    return home


@pytest.fixture(scope="session")
def digits_m_root(data_home):
    from vislearn.data.make import make_digits_m

    return make_digits_m(data_home / "digits_m-0", seed=0)


@pytest.fixture(scope="session")
def digits_folders_root(data_home):
    from vislearn.data.make import make_digits_folders

    return make_digits_folders(data_home / "digits_folders-0", seed=0)


@pytest.fixture(scope="session")
def mirrored_runs(tmp_path_factory, data_home, request):
    """Every fit registered with `helpers.register_mirrored_fit`, run once in one subprocess."""
    from helpers import run_mirrored_fits

    return run_mirrored_fits(tmp_path_factory.mktemp("mirrored"), request.getfixturevalue)
