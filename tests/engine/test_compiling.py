"""``optim.compile``: torch.compile (inductor, C++ on the CPU) of the real network, and the eager fallback
when compiling cannot work on this machine."""

from __future__ import annotations

import json

import pytest
import torch

from engine.compiling import compile_or_eager
from engine.config import apply_overrides
from engine.progress import ProgressLog
from engine.recipes import get_recipe
from model import build_retinanet
from pipeline.batch import Batch

pytestmark = pytest.mark.slow


def _setup(tmp_path):
    cfg = apply_overrides(get_recipe("tiny_cpu"), ["data.train_uri=unused", "optim.compile=true"])
    torch.manual_seed(0)
    net, loss_fn, _ = build_retinanet(cfg.model)
    boxes = torch.tensor([[[8.0, 10.0, 60.0, 70.0], [70.0, 20.0, 120.0, 100.0]]]).repeat(2, 1, 1)
    batch = Batch(
        images=torch.randn(2, 3, 128, 128),
        image_sizes=torch.tensor([[128, 128]] * 2),
        original_sizes=torch.tensor([[128, 128]] * 2),
        image_ids=torch.tensor([1, 2]),
        boxes=boxes,
        labels=torch.tensor([[0, 1], [1, 0]]),
        num_boxes=torch.tensor([2, 2]),
        flipped=torch.tensor([False, False]),
    )
    log = ProgressLog(cfg, 0, tmp_path, history=[], start_step=0)
    return net, loss_fn, batch, log


def _events(tmp_path) -> list[dict]:
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def test_compiled_network_computes_the_eager_loss_and_gradients(tmp_path) -> None:
    net, loss_fn, batch, log = _setup(tmp_path)
    eager_loss = loss_fn(net(batch.images), batch.targets())["loss"]
    eager_loss.backward()
    eager_grad = net.head.cls_logits.weight.grad.clone()
    net.zero_grad(set_to_none=True)

    compiled = compile_or_eager(net, loss_fn, batch, amp=False, channels_last=False, log=log, step=0, rank=0)

    assert compiled is not None and compiled is not net
    assert net.head.cls_logits.weight.grad is None, "the trial step's gradients must be discarded"
    loss = loss_fn(compiled(batch.images), batch.targets())["loss"]
    loss.backward()
    assert torch.allclose(loss, eager_loss, rtol=1e-4)
    assert torch.allclose(net.head.cls_logits.weight.grad, eager_grad, rtol=1e-3, atol=1e-6)
    assert not [e for e in _events(tmp_path) if e.get("event") == "compile_failed"]


def test_no_cpp_compiler_trains_eagerly_with_a_warning(tmp_path, monkeypatch, capsys) -> None:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # no graph cached from the test above
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    net, loss_fn, batch, log = _setup(tmp_path)

    result = compile_or_eager(net, loss_fn, batch, amp=False, channels_last=False, log=log, step=0, rank=0)

    assert result is None
    assert net.head.cls_logits.weight.grad is None
    out = capsys.readouterr().out
    assert "WARNING: torch.compile failed" in out and "training without it" in out
    (event,) = [e for e in _events(tmp_path) if e.get("event") == "compile_failed"]
    assert event["step"] == 0 and event["reason"]
    torch._dynamo.reset()
