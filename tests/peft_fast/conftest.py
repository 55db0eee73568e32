import os

import pytest

AGAINST_PEFT = os.environ.get("PEFT_FAST_TESTS_AGAINST_PEFT") == "1"


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    """The command-line workspace (tests/helpers/cli_workspace.py), built once for test_cli_*.py."""
    from cli_workspace import make_workspace

    return make_workspace(tmp_path_factory.mktemp("cli"))
