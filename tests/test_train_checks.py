"""The configs of the short CamVid checks (``mdp_train.checks``): the experiment's small
model on A+B, each arm's overrides, and the semi arms' hidden-label set."""
from mdp_train import checks
from mdp_train.trainer import Trainer


def test_check_configs(tmp_path):
    con = checks._config(tmp_path, 200, tmp_path / "o", checks.CON_ARMS["bank"], semi=False)
    assert [d["name"] for d in con["data"]["datasets"]] == ["A", "B"]
    assert con["data"]["datasets"][1]["remap"].endswith("camvid_coarse.txt")
    assert con["data"]["unlabelled"] == [] and con["loss"]["con_space"] == "bank"
    assert (con["model"]["width"], con["train"]["batch_size"], con["data"]["crop_size"]) == \
        (32, 16, 96)
    assert con["train"]["steps"] == 200 and con["train"]["probe_every"] == 50
    semi = checks._config(tmp_path, 100, tmp_path / "o",
                          checks.SEMI_ARMS["cosine0.8-nowarmup (paper)"], semi=True)
    assert semi["data"]["unlabelled"] == [{"type": "folder", "root": str(tmp_path),
                                           "subsets": ["0001TP"], "name": "U", "hidden": "A"}]
    assert (semi["semi"]["confidence"], semi["semi"]["threshold"],
            semi["semi"]["warmup_steps"]) == ("cosine", 0.8, 0)
    assert semi["train"]["log_every"] == 1 and semi["train"]["probe_every"] == 0
    for cfg in (con, semi):
        Trainer._check(cfg)
