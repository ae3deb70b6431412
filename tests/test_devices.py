"""--device has one reading (adl.devices.parse_device) in every command and the Python API.

GPUs and MPS are simulated by patching torch's public availability functions."""

import pytest
import torch
from typer.testing import CliRunner

from adl.cli import app
from adl.devices import parse_device
from adl.errors import AdlError
from adl.extract import models
from adl.extract.config import ExtractConfig
from adl.peers.config import FinetuneConfig
from adl.serve.predictor import Predictor
from adl.train.config import TrainConfig


@pytest.fixture
def machine(monkeypatch):
    """machine(gpus, mps=False, local_rank=None): what torch reports on the simulated machine."""

    def make(gpus: int, mps: bool = False, local_rank: str | None = None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        if local_rank is None:
            monkeypatch.delenv("LOCAL_RANK", raising=False)
        else:
            monkeypatch.setenv("LOCAL_RANK", local_rank)

    return make


@pytest.mark.parametrize("gpus, mps, local_rank, spec, expected", [
    (0, False, None, "auto", "cpu"),
    (0, True, None, "auto", "cpu"),  # MPS only when asked for
    (2, False, None, "auto", "cuda:0"),
    (2, False, "1", "auto", "cuda:1"),  # torchrun: one GPU per process
    (2, False, None, "cpu", "cpu"),
    (2, False, None, "cuda", "cuda:0"),
    (2, False, "1", "cuda", "cuda:1"),
    (2, False, None, "cuda:1", "cuda:1"),
    (4, False, "0", "cuda:3", "cuda:3"),  # a named GPU is never remapped to $LOCAL_RANK
    (4, False, "2", "cuda:1", "cuda:1"),
    (0, True, None, "mps", "mps"),
])
def test_each_spelling_names_one_device(machine, gpus, mps, local_rank, spec, expected):
    machine(gpus, mps, local_rank)
    assert parse_device(spec) == expected


@pytest.mark.parametrize("gpus, mps, spec, message", [
    (0, False, "cuda", "--device cuda, but torch .* sees no CUDA device: use --device cpu"),
    (0, False, "cuda:0", "--device cuda:0, but torch .* sees no CUDA device"),
    (2, False, "cuda:2", r"--device cuda:2 names GPU 2, but torch sees 2 \(cuda:0 .. cuda:1\)"),
    (2, False, "mps", "--device mps, but torch .* has no MPS device here .*: use --device cpu"),
    (2, True, "gpu", "--device 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
    (2, True, "CUDA", "is not a device"),
    (2, True, "cuda:", "is not a device"),
    (2, True, "cuda:x", "is not a device"),
    (2, True, "cuda:-1", "is not a device"),
    (2, True, "", "is not a device"),
])
def test_anything_else_is_refused(machine, gpus, mps, spec, message):
    machine(gpus, mps)
    with pytest.raises(AdlError, match=message):
        parse_device(spec)


def test_a_bad_local_rank_is_one_line(machine):
    machine(2, local_rank="x")
    with pytest.raises(AdlError, match=r"\$LOCAL_RANK is 'x'"):
        parse_device("cuda")
    assert parse_device("cuda:1") == "cuda:1"


def test_the_backbone_plan_keeps_the_named_gpu(machine):
    machine(2, local_rank="0")
    plan = models.select_device("cuda:1")
    assert (plan.device, plan.autocast, plan.pin_memory) == ("cuda:1", torch.bfloat16, True)
    machine(0, mps=True)
    plan = models.select_device("mps")
    assert (plan.device, plan.autocast, plan.pin_memory) == ("mps", None, False)


@pytest.mark.parametrize("command", [
    ["extract", "--model", "minilm", "--dataset", "tweets"],
    ["train", "--cache", "nowhere"],
    ["baselines", "--cache", "nowhere"],
    ["sweep", "--cache", "nowhere", "--alpha", "1,2"],
    ["predict", "--run", "nowhere", "--text", "hi"],
    ["serve", "--run", "nowhere"],
    ["finetune", "--cache", "nowhere", "--method", "lora"],
])
def test_every_command_refuses_a_misspelt_device_on_one_line(command):
    res = CliRunner().invoke(app, [*command, "--device", "gpu"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--device 'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps" in lines[0]


@pytest.mark.parametrize("build", [
    lambda: Predictor(["nowhere"], device="gpu"),
    lambda: TrainConfig(cache="nowhere", device="gpu"),
    lambda: ExtractConfig(model="minilm", dataset="tweets", device="gpu"),
    lambda: FinetuneConfig(cache="nowhere", method="lora", device="gpu"),
])
def test_the_python_api_reads_devices_the_same_way(build):
    with pytest.raises(AdlError, match="--device 'gpu' is not a device"):
        build()
    with pytest.raises(AdlError, match="is not a device"):
        Predictor(["nowhere"], device="cuda:one")
