"""LayerTaps finds the backbone's layers by checking, not by guessing: the hooked states must equal
the model's own output_hidden_states on a dummy batch, or heads are not attached (one line)."""

import numpy as np
import pytest
import torch
from tiny_backbones import bert_folder, write_csv
from torch import nn

from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.serve.taps import LayerTaps, layer_lists
from adl.train.config import TrainConfig
from adl.train.run import run_train


class WithAdapters(nn.Module):
    """A wrapper whose own list of L-1 adapters comes first in module order and runs after the model:
    a list of the right length, called in every forward, that does not hold the transformer layers."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        n, h = inner.config.num_hidden_layers, inner.config.hidden_size
        self.adapters = nn.ModuleList(nn.Linear(h, h) for _ in range(n))
        self.inner = inner
        self.config = inner.config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        h = out.last_hidden_state
        for adapter in self.adapters:
            h = adapter(h)
        return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("taps")
    run_extract(ExtractConfig(model=str(bert_folder(root / "bert")), dataset=f"csv:{write_csv(root / 'd.csv')}",
                              out=str(root / "c"), views="tokens", batch_size=8, progress=False))
    run_train(TrainConfig(cache=str(root / "c"), out=str(root / "r"), head="adalayers", k=8, heads=2, ff=16,
                          max_epochs=1, device="cpu"))
    return root / "r"


def test_a_decoy_list_of_the_same_length_is_passed_over(run):
    p = Predictor([run], device="cpu")
    texts = ["good movie", "the plot was thin and the cast was worse"]
    plain = p(texts).logits[run.name]
    real = p.backbone.model.encoder.layer
    p.backbone.model = WithAdapters(p.backbone.model)
    lists = layer_lists(p.backbone.model, len(real))
    assert lists[0] is p.backbone.model.adapters and lists[1] is real  # matching by length picks the decoy
    p.taps = LayerTaps(p.backbone)
    assert p.taps.layers is real
    for a, b in zip(p(texts).logits[run.name], plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_list_holding_the_layers_is_refused_on_one_line(run):
    p = Predictor([run], device="cpu")
    encoder = p.backbone.model.encoder
    encoder.layer = nn.Sequential(*encoder.layer)  # runs the same, but is no ModuleList
    p.backbone.model = WithAdapters(p.backbone.model)
    with torch.inference_mode():
        p.backbone.hidden_states(torch.tensor([[2, 3, 4]]), torch.ones(1, 3, dtype=torch.long))  # the model still runs
    with pytest.raises(AdlError, match=r"cannot attach heads to .*: none of its 1 list\(s\) of \d+ modules takes the "
                                       "hidden states output_hidden_states returns") as e:
        LayerTaps(p.backbone)
    assert "\n" not in str(e.value)
