"""Sweeps: grid parsing and errors, grouped == solo training, the study (resume, changed cache,
another sweep in the same place, storage errors), TPE, and `adl sweep` / `--report` end to end."""

import csv
import dataclasses
import json

import numpy as np
import optuna
import pytest
import torch
from synthetic import write_synthetic_cache
from typer.testing import CliRunner

from adl.cache import open_cache
from adl.cli import app
from adl.errors import AdlError
from adl.sweep import worker as sweep_run
from adl.sweep.config import (
    Choice,
    Range,
    SweepConfig,
    SweepSpace,
    parse_dim,
    parse_space,
)
from adl.sweep.group import fit_group
from adl.sweep.storage import mask, open_storage, safe_url
from adl.sweep.study import SweepStudy
from adl.train.config import TrainConfig, resolve, view_for
from adl.train.data import load_data
from adl.train.head_io import make_head
from adl.train.trainer import fit

runner = CliRunner()
FAST = dict(head="adalayers-pooled", k=4, hidden=8, max_epochs=2, patience=2, lr_patience=1, lr=0.01, batch_size=16)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    return {"seq": write_synthetic_cache(d / "seq", n=(48, 24, 24), strength=0.6),
            "ner": write_synthetic_cache(d / "ner", task="token", n=(32, 16, 16), strength=0.6)}


def sweep_cfg(cache, out, space, **kw):
    base = TrainConfig(cache=str(cache), **{**FAST, **kw.pop("base", {})})
    return SweepConfig(base=base, space=parse_space(space), out=str(out), baselines="off", **kw)


# ---- parsing and validation ------------------------------------------------------------------

def test_parse_lists_ranges_and_types():
    assert parse_dim("alpha", "16, 64,128,64") == Choice((16.0, 64.0, 128.0))  # duplicates dropped
    assert parse_dim("k", "32,64") == Choice((32, 64))
    assert parse_dim("pos_emb", "true,no") == Choice((True, False))
    assert parse_dim("alpha", "8:256:log") == Range(8.0, 256.0, True, False)
    assert parse_dim("k", "8:64") == Range(8, 64, False, True)
    assert parse_dim("head", "adalayers,adalayers-pooled").values == ("adalayers", "adalayers-pooled")


@pytest.mark.parametrize("name, text, match", [
    ("alpha", "", "is empty"),
    ("alpha", "1,,2", "empty value"),
    ("alpha", "x", "not a number"),
    ("k", "2.5", "not an integer"),
    ("pos_emb", "maybe", "true or false"),
    ("alpha", "8:4", "lo < hi"),
    ("alpha", "0:4:log", "log range needs lo > 0"),
    ("alpha", "1:4:ln", "lo:hi or lo:hi:log"),
    ("cache", "a,b", "not a hyperparameter"),
    ("nonsense", "1", "not a hyperparameter"),
])
def test_parse_errors(name, text, match):
    with pytest.raises(AdlError, match=match):
        parse_dim(name, text)


@pytest.mark.parametrize("space, kw, match", [
    ({"k": "0,4"}, {}, "--k must be an integer >= 1"),
    ({"cutoff": "0,1"}, {}, r"--cutoff must be in \[0, 1\)"),
    ({"alpha": "0,1"}, {}, "--alpha must be > 0"),
    ({"lam": "-1,0"}, {}, "--lambda must be >= 0"),
    ({"cutoff": "0:1"}, {"search": "tpe", "trials": 2}, r"--cutoff must be in \[0, 1\)"),
    ({"alpha": "1:8"}, {}, "ranges need --search tpe"),
    ({"alpha": "1,8"}, {"search": "tpe"}, "needs --trials"),
    ({"alpha": "1,8"}, {"trials": 3}, "--trials applies to --search tpe"),
    ({"seed": "1,2"}, {"seeds": 2}, "not both"),
    ({"alpha": "8"}, {}, "nothing to sweep"),
    ({"alpha": "1,8"}, {"search": "random"}, "unknown --search"),
])
def test_sweep_config_errors(tmp_path, space, kw, match):
    with pytest.raises(AdlError, match=match):
        sweep_cfg("c", tmp_path, space, **kw)


def test_grid_points_are_grouped_by_shape(tmp_path):
    cfg = sweep_cfg("c", tmp_path, {"alpha": "1,8", "k": "4,8", "cutoff": "0,0.1", "dropout": "0.2"}, seeds=2)
    assert cfg.fixed.dropout == 0.2 and "dropout" not in cfg.dims  # one value: fixed, not a dimension
    space = SweepSpace(cfg)
    assert len(space.points) == 16 and {p["seed"] for p in space.points} == {0, 1}
    shapes = [space.shape_of(i) for i in range(16)]
    assert all(shapes[i] == shapes[4 * (i // 4)] for i in range(16))  # 4 shapes of 4 neighbours
    assert len(set(shapes)) == 4


# ---- grouped training == solo training -------------------------------------------------------

MIXED = [dict(alpha=1.0, cutoff=0.0, lam=0.0), dict(alpha=4.0, cutoff=0.2, lam=0.05, weight_decay=0.0),
         dict(alpha=16.0, lr=1e-2, weight_decay=0.1, patience=1)]
# one lr and weight decay (a usual grid): one stacked part, regrouped with its AdamW moments when a
# plateau halves one configuration's lr and not the others'
SHARED = [dict(alpha=1.0, lam=0.0), dict(alpha=4.0, cutoff=0.2, lam=0.05, lr_patience=0), dict(alpha=16.0, lam=0.0),
          dict(alpha=2.0, lam=0.01, patience=1)]


@pytest.mark.parametrize("name, head, affine, points", [
    ("seq", "adalayers-pooled", False, MIXED), ("seq", "adalayers", False, MIXED), ("ner", "adalayers", False, MIXED),
    ("seq", "adalayers-pooled", True, MIXED), ("seq", "adalayers-pooled", False, SHARED),
    ("ner", "adalayers", False, SHARED)])
def test_group_matches_solo(caches, name, head, affine, points):
    cache = open_cache(caches[name])
    base = TrainConfig(cache=str(caches[name]), head=head, k=8, heads=2, ff=16, hidden=8, dropout=0.0, max_epochs=5,
                       patience=2, lr_patience=1, lr=3e-3, batch_size=16, seed=1, norm_affine=affine)
    cfgs = [resolve(dataclasses.replace(base, **p), cache) for p in points]
    data = load_data(cache, view_for(head, cache, None), device="cpu", seed=1, memory_gb=1)

    def build(c):
        torch.manual_seed(c.seed)
        return make_head(c, data, cache.manifest)

    solo_heads = [build(c) for c in cfgs]
    solo = [fit(h, data, c) for h, c in zip(solo_heads, cfgs)]
    group_heads = [build(c) for c in cfgs]
    grouped = fit_group(group_heads, data, cfgs)
    if points is SHARED:  # the lrs parted during training, so the regrouping was exercised
        lrs = [[row["lr"] for row in g.history] for g in grouped]
        assert any(len({h[e] for h in lrs if len(h) > e}) > 1 for e in range(max(map(len, lrs))))
    for s, g, hs, hg in zip(solo, grouped, solo_heads, group_heads):
        assert (s.best_epoch, s.stop_reason, len(s.history)) == (g.best_epoch, g.stop_reason, len(g.history))
        for rs, rg in zip(s.history, g.history):
            assert rs["loss"] == pytest.approx(rg["loss"], rel=1e-4, abs=1e-6)
            assert rs["lr"] == rg["lr"]
            assert rs[f"val_{s.metric}"] == pytest.approx(rg[f"val_{s.metric}"], abs=1e-9)
        assert s.test[s.metric] == pytest.approx(g.test[g.metric], abs=1e-9)
        np.testing.assert_allclose(s.weights, g.weights, atol=1e-5)
        for (n, a), (_, b) in zip(hs.state_dict().items(), hg.state_dict().items()):
            if n.endswith("attn.in_proj_bias"):  # the key bias has an exactly-zero gradient (softmax is shift
                a, b = a[torch.arange(len(a)) // 8 != 1], b[torch.arange(len(b)) // 8 != 1]  # invariant):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=n)  # Adam amplifies its rounding noise


def test_group_stops_a_pruned_config_and_keeps_the_others(caches):
    cache = open_cache(caches["seq"])
    cfgs = [resolve(TrainConfig(cache=str(caches["seq"]), **{**FAST, "max_epochs": 3, "patience": 3}, alpha=a),
                    cache) for a in (1.0, 2.0, 4.0)]
    data = load_data(cache, "pooled:mean", device="cpu", seed=0, memory_gb=1)
    heads = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        heads.append(make_head(c, data, cache.manifest))
    res = fit_group(heads, data, cfgs, on_epoch=lambda i, row: i == 1)
    assert [r.stop_reason for r in res] == ["max_epochs", "pruned", "max_epochs"]
    assert [len(r.history) for r in res] == [3, 1, 3] and res[1].test is not None


# ---- the study: resume, refusals, storage -------------------------------------------------

def _trials(out, name=None):
    study = optuna.load_study(study_name=name or out.name, storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials()


@pytest.fixture
def fast_heartbeat(monkeypatch):
    monkeypatch.setattr("adl.sweep.study.HEARTBEAT_S", 0.1)
    monkeypatch.setattr("adl.sweep.study.GRACE_S", 3.0)


def _killed_in_second_group(monkeypatch):
    """Worker.run dies in its second call like kill -9: no cleanup, no release, the heartbeat stops."""
    real_run, calls = sweep_run.Worker.run, []

    def dies(self, jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise SystemExit("killed")
        real_run(self, jobs)

    monkeypatch.setattr(sweep_run.Worker, "run", dies)
    monkeypatch.setattr(SweepStudy, "release", lambda self, trials: None)


def test_resume_after_a_killed_sweep_keeps_finished_trials(caches, tmp_path, monkeypatch, fast_heartbeat):
    out = tmp_path / "s"
    cfg = sweep_cfg(caches["seq"], out, {"alpha": "1,8", "k": "4,8", "cutoff": "0,0.1"}, group_size=4)
    with monkeypatch.context() as m:
        _killed_in_second_group(m)
        with pytest.raises(SystemExit):
            sweep_run.run_sweep(cfg)
    first = {t.number: t.user_attrs["adl_result"] for t in _trials(out) if t.state.name == "COMPLETE"}
    assert len(first) == 4 and sum(t.state.name == "RUNNING" for t in _trials(out)) == 4
    result = sweep_run.run_sweep(cfg)  # waits for the 4 silent trials to go stale, then reruns them
    trials = _trials(out)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert result["ran"] == 4 and len(complete) == 8  # the 4 killed points rerun, nothing else
    assert sorted(t.user_attrs["adl_point"] for t in complete) == list(range(8))  # every point once
    assert {t.number: t.user_attrs["adl_result"] for t in complete if t.number in first} == first
    assert sum(t.state.name == "FAIL" and t.user_attrs.get("adl_released") != "surplus" for t in trials) == 4
    assert sweep_run.run_sweep(cfg)["ran"] == 0  # a finished sweep reruns nothing
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_a_trial_killed_between_ask_and_tag_is_requeued(caches, tmp_path, monkeypatch, fast_heartbeat):
    out = tmp_path / "s"
    cfg = sweep_cfg(caches["seq"], out, {"alpha": "1,8", "k": "4,8"}, group_size=2)
    with monkeypatch.context() as m:
        m.setattr(SweepStudy, "_tag", lambda self, trial, idx: (_ for _ in ()).throw(SystemExit("killed")))
        m.setattr(SweepStudy, "release", lambda self, trials: None)
        with pytest.raises(SystemExit):
            sweep_run.run_sweep(cfg)
    assert [t.state.name for t in _trials(out)] == ["RUNNING"] and "adl_worker" not in _trials(out)[0].user_attrs
    assert sweep_run.run_sweep(cfg)["ran"] == 4
    complete = [t for t in _trials(out) if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["adl_point"] for t in complete) == [0, 1, 2, 3]
    space = SweepSpace(cfg)
    assert all(t.params == space.points[t.user_attrs["adl_point"]] for t in complete)  # values match the point


def test_a_live_worker_is_not_failed_and_a_stale_owner_carries_on(caches, tmp_path, monkeypatch, fast_heartbeat):
    """Another worker's beating trial is left alone; a worker whose trial was failed as stale
    meanwhile drops its result with one line and finishes the sweep."""
    out = tmp_path / "s"
    cfg = sweep_cfg(caches["seq"], out, {"alpha": "1,8"}, group_size=1)
    real_finish, seen = SweepStudy.finish, []

    def peer_fails_my_trial(self, trial, *args):  # as if a peer judged this worker dead during the group
        if not seen:
            seen.append(trial.number)
            study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        return real_finish(self, trial, *args)

    monkeypatch.setattr(SweepStudy, "finish", peer_fails_my_trial)
    result = sweep_run.run_sweep(cfg)
    states = {t.number: t.state.name for t in _trials(out)}
    assert states[seen[0]] == "FAIL" and result["ran"] == 2
    assert list(states.values()).count("COMPLETE") == 1  # the stale owner's result was dropped


def test_ctrl_c_requeues_the_running_trials_at_once(caches, tmp_path, monkeypatch):
    out = tmp_path / "s"
    cfg = sweep_cfg(caches["seq"], out, {"alpha": "1,8", "k": "4,8"}, group_size=2)
    real_run, calls = sweep_run.Worker.run, []

    def interrupted(self, jobs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_run(self, jobs)

    monkeypatch.setattr(sweep_run.Worker, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_run.run_sweep(cfg)
    states = [t.state.name for t in _trials(out)]
    assert states.count("COMPLETE") == 2 and states.count("WAITING") == 2 and "RUNNING" not in states
    monkeypatch.undo()
    assert sweep_run.run_sweep(cfg)["ran"] == 2
    assert sorted(t.user_attrs["adl_point"] for t in _trials(out) if t.state.name == "COMPLETE") == [0, 1, 2, 3]


def test_changed_cache_and_other_sweep_are_refused_and_the_study_kept(caches, tmp_path):
    cache = tmp_path / "cache"
    write_synthetic_cache(cache, n=(24, 12, 12))
    out = tmp_path / "s"
    cfg = sweep_cfg(cache, out, {"alpha": "1,8"})
    sweep_run.run_sweep(cfg)
    with pytest.raises(AdlError, match="different sweep"):
        sweep_run.run_sweep(sweep_cfg(cache, out, {"alpha": "1,16"}))
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "created": "another time"}))
    with pytest.raises(AdlError, match="cache changed since"):
        sweep_run.run_sweep(cfg)
    assert sum(t.state.name == "COMPLETE" for t in _trials(out)) == 2


def test_unreachable_storage_is_one_line_without_the_password(tmp_path):
    with pytest.raises(AdlError, match=r"postgresql\+psycopg2://adl:\*\*\*@127.0.0.1:1/db") as e:
        open_storage("postgresql://adl:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AdlError, match="cannot open study storage nosuch://x"):
        open_storage("nosuch://x")


@pytest.mark.parametrize("vectorise", [True, False])
def test_tpe_search_with_ranges_and_seeds(caches, tmp_path, vectorise):
    out = tmp_path / "tpe"
    cfg = sweep_cfg(caches["seq"], out, {"alpha": "1:32:log", "cutoff": "0,0.1", "k": "2:6"}, search="tpe",
                    trials=3, seeds=2, storage=f"journal:{tmp_path / 'journal.log'}", vectorise=vectorise)
    res = sweep_run.run_sweep(cfg)
    assert res["ran"] == 3 and sum(res["progress"].get(s, 0) for s in ("complete", "pruned")) == 3
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["seed"] for r in rows} == {"0", "1"}  # every trial ran both seeds
    assert all(1 <= float(r["alpha"]) <= 32 and 2 <= int(r["k"]) <= 6 for r in rows)


# ---- the CLI -----------------------------------------------------------------------------

def test_cli_grid_then_report(caches, tmp_path):
    out = tmp_path / "cli"
    args = ["sweep", "--cache", caches["seq"], "--out", out, "--alpha", "1,8", "--k", "4,8", "--seeds", "2",
            "--head", "adalayers-pooled", "--hidden", "8", "--max-epochs", "2", "--lr", "0.01"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "top configurations" in res.output and "8 complete" in res.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"alpha", "k", "seed", "params", "val_accuracy", "test_accuracy", "epochs",
                               "seconds", "active_layers", "w_0", "w_3"} <= set(rows[0])
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "accuracy" and len(best["best"]["seeds"]) == 2
    assert best["command"].startswith(f"adl train --cache {caches['seq']}")
    lines = list(csv.DictReader(open(out / "baselines.csv")))
    assert [r["name"] for r in lines] == ["single-layer"] * 4 + ["linear-probe"] * 4 + ["concat-probe"]
    for png in ("metric_vs_hparams.png", "layer_weights.png", "quality_vs_params.png"):
        assert (out / png).stat().st_size > 0
        (out / png).unlink()
    res = runner.invoke(app, ["sweep", "--report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "quality_vs_params.png").is_file() and "top configurations" in res.output
    res = runner.invoke(app, ["sweep", "--cache", str(caches["seq"]), "--alpha", "1:8"])
    assert res.exit_code == 2 and "ranges need --search tpe" in res.output


@pytest.mark.parametrize("url, secret", [("postgresql://bob:s3cr3t@127.0.0.1:1/db", "s3cr3t"),
                                         ("postgresql://:s3cr3t@127.0.0.1:1/db", "s3cr3t"),
                                         ("postgresql://127.0.0.1:1/db?user=bob&password=s3cr3t", "s3cr3t"),
                                         ("postgresql://bob:p%40ss@127.0.0.1:1/db", "p@ss")])
def test_storage_passwords_never_printed(caches, tmp_path, url, secret):
    assert secret not in safe_url(url) and "***" in safe_url(url)
    assert mask(f'could not connect: dsn "password={secret}" user bob', url).count(secret) == 0
    r = runner.invoke(app, ["sweep", "--cache", str(caches["seq"]), "--alpha", "1,2", "--out", str(tmp_path / "s")],
                      env={"ADL_STORAGE": url})
    assert r.exit_code == 2 and "cannot open study storage" in r.output, r.output
    assert secret not in r.output and "p%40ss" not in r.output
