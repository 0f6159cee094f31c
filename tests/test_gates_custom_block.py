"""A user block registered with register_block_layout, as docs/gates.md describes it: conv, BatchNorm
and activation children and a ``downsample`` child, but no ``stride`` or ``elastic_shortcut``
attributes (those belong to nas.supernet.resnet's blocks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nas.gates import BlockLayout, GatedResidualBlock, GateRuntime
from nas.gates import layouts


class PlainBlock(nn.Module):
    """conv_a (3x3, stride) -> bn_a -> relu -> conv_b (3x3) -> bn_b, plus an optional 1x1 projection, then relu."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(cin, inner, 3, stride, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(inner)
        self.act_a = nn.ReLU()
        self.conv_b = nn.Conv2d(inner, cout, 3, 1, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if project else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn_b(self.conv_b(self.act_a(self.bn_a(self.conv_a(x)))))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


LAYOUT = BlockLayout((("conv_a", "bn_a", "act_a"), ("conv_b", "bn_b", None)), producer=0, final_act="act")


@pytest.mark.parametrize("cin, cout, stride, project", [
    pytest.param(16, 16, 1, True, id="projection-same-width"),
    pytest.param(16, 16, 2, True, id="stride2-same-width"),
    pytest.param(8, 16, 2, True, id="stride2-wider"),
    pytest.param(16, 16, 1, False, id="identity"),
])
def test_custom_block_full_keep_matches(monkeypatch, cin, cout, stride, project):
    monkeypatch.setitem(layouts._LAYOUTS, PlainBlock, LAYOUT)
    torch.manual_seed(0)
    block = PlainBlock(cin, 16, cout, stride, project).eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    gated = GatedResidualBlock(block, layouts.block_layout(block), cin, 14, True, True, GateRuntime()).eval()
    x = torch.randn(2, cin, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), block(x), atol=1e-5, rtol=1e-5)


def test_model_without_gateable_block_warns(caplog):
    from nas.gates import apply_gates

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = PlainBlock(4, 8, 4, 1, False)  # not registered in this test
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x).mean((2, 3)))

    with caplog.at_level("WARNING", logger="nas.gates.network"):
        apply_gates(Net().eval(), {"name": "feature", "placement": "all"}, input_shape=(4, 8, 8))
    assert "no block of a gateable type" in caplog.text
    assert "register_block_layout" in caplog.text
