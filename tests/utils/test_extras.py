"""missing_extra: what an entry point reports when an optional extra is not installed."""
from deepseek_vl2.utils.extras import missing_extra


def test_installed_modules_need_nothing():
    assert missing_extra("serve", ("json", "email")) is None


def test_missing_modules_are_named_with_the_install_command():
    assert missing_extra("serve", ("json", "no_such_module_a")) == \
        'no_such_module_a is not installed: pip install -e ".[serve]"'
    assert missing_extra("ray", ("no_such_module_a", "no_such_module_b")) == \
        'no_such_module_a and no_such_module_b are not installed: pip install -e ".[ray]"'
