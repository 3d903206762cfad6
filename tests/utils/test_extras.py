"""missing_extra: what an entry point reports when an optional extra is not installed."""
from deepseek_vl2.utils.extras import EXTRA_MODULES, missing_extra


def test_installed_extras_need_nothing():
    assert missing_extra("serve") is None  # the dev extra installs the server's modules


def test_missing_modules_are_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(EXTRA_MODULES, "serve", ("json", "no_such_module_a"))
    assert missing_extra("serve") == 'no_such_module_a is not installed: pip install -e ".[serve]"'
    monkeypatch.setitem(EXTRA_MODULES, "ray", ("no_such_module_a", "no_such_module_b"))
    assert missing_extra("ray") == 'no_such_module_a and no_such_module_b are not installed: pip install -e ".[ray]"'


def test_every_extra_named_is_one_pyproject_declares():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert set(EXTRA_MODULES) <= set(pyproject["project"]["optional-dependencies"])
