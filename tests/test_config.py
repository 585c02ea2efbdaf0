"""``mdp_kernels.config``: one settings object, validated, changed at run time."""
import pytest

import mdp_kernels as mk


def test_unknown_setting_raises():
    with pytest.raises(AttributeError, match="no setting 'tile_rows'"):
        mk.config.tile_rows = 32
    with pytest.raises(AttributeError, match="_listeners"):
        mk.config._listeners = []


@pytest.mark.parametrize("name, value, error", [
    ("deterministic", 1, TypeError), ("triton_autotune", "yes", TypeError),
    ("triton_fp32", "fast", ValueError), ("cpu_tile_rows", 0, ValueError),
    ("cpu_pix_cols", True, ValueError), ("triton_meta", {"BLOCK_X": 16}, ValueError),
    ("triton_meta", {"BLOCK_P": -1}, ValueError)])
def test_bad_values_raise_and_keep_the_old_value(name, value, error):
    old = getattr(mk.config, name)
    with pytest.raises(error, match=f"config.{name}"):
        setattr(mk.config, name, value)
    assert getattr(mk.config, name) == old


def test_override_restores_after_an_exception():
    old = (mk.config.save, mk.config.cpu_tile_rows)
    with pytest.raises(RuntimeError, match="inside"):
        with mk.config.override(save="none", cpu_tile_rows=16):
            assert (mk.config.save, mk.config.cpu_tile_rows) == ("none", 16)
            raise RuntimeError("inside")
    assert (mk.config.save, mk.config.cpu_tile_rows) == old
    with pytest.raises(ValueError, match="config.save"):  # a bad value restores the rest
        with mk.config.override(cpu_tile_rows=16, save="all"):
            pass
    assert (mk.config.save, mk.config.cpu_tile_rows) == old


def test_listeners_follow_changes():
    """A listener sees the settings now, at each change and at the restore."""
    seen, old = [], mk.config.cpu_pix_cols
    mk.config.on_change(lambda cfg: seen.append(cfg.cpu_pix_cols))
    try:
        with mk.config.override(cpu_pix_cols=64):
            pass
        assert seen == [old, 64, old]
    finally:
        mk.config._listeners.pop()
    assert repr(mk.config).startswith("mdp_kernels.config(save=")
