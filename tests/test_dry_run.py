"""tools/dry_run: the real training step on meta tensors gives the bytes the same step holds on real tensors,
and leaves torch and transformers as it found them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optim_mod
from transformers import LlamaConfig, RobertaConfig, masking_utils

from badam_hf.tools.cli import main
from badam_hf.tools.dry_run import Setting, StorageCounter, meta_workarounds, run_method

LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)


def llama_setting(**badam) -> Setting:
    return Setting(config=LlamaConfig(**LLAMA), name="tiny-llama", batch=2, seq=32, badam=badam)


def same_on_meta_and_cpu(setting: Setting, method: str) -> dict:
    meta = run_method(setting, method, "meta")
    cpu = run_method(setting, method, "cpu")
    assert [s["step"] for s in meta["steps"]] == [s["step"] for s in cpu["steps"]]
    for m, c in zip(meta["steps"], cpu["steps"]):
        assert m["peak_bytes"] == c["peak_bytes"], (m["step"], m["peak_bytes"], c["peak_bytes"])
        assert m["phase"] == c["phase"] and m["alive_at_peak"] == c["alive_at_peak"], m["step"]
        assert m["phase_peaks"] == c["phase_peaks"], m["step"]
    return meta


@pytest.mark.parametrize("badam", [
    {"switch_every": 2},
    {"mode": "ratio", "switch_every": 2},
    {"mode": "lisa", "switch_every": 2, "lisa_layers": 2},
], ids=["layer", "ratio", "lisa"])
def test_badam_modes_meta_equals_cpu_to_the_byte(badam):
    res = same_on_meta_and_cpu(llama_setting(**badam), "badam")
    assert [s["step"] for s in res["steps"]] == ["first step of a block", "later step (K=2)", "checkpoint save"]


def test_a_checkpoint_save_rebuilds_one_master_at_a_time():
    """Saving mid-visit (masters held split) rebuilds each fp32 master on the device, copies it to the CPU and
    frees it before the next: the save adds the largest one tensor's fp32 copy (4 x h x i), not the block's
    (4 x layer, what rebuilding them all before copying held). Meta equals CPU to the byte."""
    res = same_on_meta_and_cpu(llama_setting(switch_every=2, chunked_loss=False), "badam")
    save = res["steps"][-1]
    assert save["step"] == "checkpoint save" and save["phase"] == "checkpoint save"
    h, i, kv = 64, 128, 32
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    alive = save["alive_at_peak"]
    assert alive["checkpoint temporaries"] == 4 * h * i
    assert alive["low halves"] == 2 * layer and alive["moments"] == 8 * layer + 4 * 9
    all_at_once = save["peak_bytes"] - alive["checkpoint temporaries"] + 4 * layer
    assert save["peak_bytes"] < all_at_once
    assert res["peak_bytes"] == max(s["peak_bytes"] for s in res["steps"])


def test_badam_layer_mode_holds_what_it_should_at_its_peaks():
    # The model's own loss (chunked_loss=false): the full logits' fp32 tensors are the later step's peak.
    # Nearest rounding at the switch: the stochastic one's temporaries are the test below.
    res = run_method(llama_setting(switch_every=2, chunked_loss=False, switch_rounding="nearest"), "badam", "meta")
    first, later, _ = res["steps"]  # the third is the checkpoint save (the test above)
    h, i, kv = 64, 128, 32
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # one decoder layer's parameters: the active block
    # The first step peaks in the inner AdamW step: fp32 gradient + master + two moments of the block.
    assert first["phase"] == "step: inner AdamW"
    alive = first["alive_at_peak"]
    assert alive["fp32 gradients"] == alive["masters"] == 4 * layer
    assert alive["moments"] == 8 * layer + 4 * 9  # two fp32 moments, plus the fp32 step count of its 9 tensors
    # A later step keeps the master as 16 low bits and peaks at the loss: 3 fp32 copies of the logits.
    assert later["phase"] == "backward: loss"
    assert later["alive_at_peak"]["low halves"] == 2 * layer
    assert later["alive_at_peak"]["loss temporaries"] >= 3 * 4 * 2 * 32 * 512
    assert res["peak_bytes"] == later["peak_bytes"] > first["peak_bytes"]


def test_chunked_loss_removes_the_full_logits_from_the_later_step():
    own = run_method(llama_setting(switch_every=2, chunked_loss=False, switch_rounding="nearest"), "badam",
                     "meta")["steps"][1]
    chunked = run_method(llama_setting(switch_every=2, loss_chunk_tokens=16, switch_rounding="nearest"), "badam",
                         "meta")["steps"][1]
    one_fp32_logits = 4 * 2 * 32 * 512  # batch x seq x vocab x 4 bytes
    assert chunked["peak_bytes"] < own["peak_bytes"]
    assert chunked["alive_at_peak"].get("loss temporaries", 0) < one_fp32_logits
    assert same_on_meta_and_cpu(llama_setting(switch_every=2, loss_chunk_tokens=16), "badam")


def test_stochastic_switch_rounding_is_counted_like_cpu_and_adds_only_its_temporaries():
    """The default (switch_rounding=auto: stochastic) writes the block's last masters through int32 temporaries
    and the noise tables at the switch; the dry run counts them as the CPU does, and they are all the switch
    step adds (at this shape too little to move the step's peak)."""
    near = run_method(llama_setting(switch_every=2, switch_rounding="nearest"), "badam", "meta")["steps"][1]
    auto = same_on_meta_and_cpu(llama_setting(switch_every=2), "badam")["steps"][1]
    h, i = 64, 128
    largest = h * i  # the block's largest tensor (an MLP matrix): the rounding works one tensor at a time
    assert 0 <= auto["peak_bytes"] - near["peak_bytes"] <= 8 * 8 * largest
    phase = "step: write back"
    extra = auto["phase_peaks"][phase] - near["phase_peaks"][phase]
    assert 0 < extra <= 8 * 8 * largest, extra


@pytest.mark.parametrize("scope", ["above", "all"])
def test_bread_each_timing_is_counted_as_it_runs(scope):
    """BREAD (active block: layer 0): `inactive_timing=step` holds every inactive bf16 gradient from the
    backward to the step; `backward` applies and frees each one in the backward, whose peak is then BAdam's
    own (plus the one-byte finite flag) with scope above. Meta equals CPU to the byte for both timings.
    The model's own loss: with the chunked loss and a trained head, meta and CPU differ in the loss's
    backward for both timings (not this test's subject)."""
    def run(**keys):
        return same_on_meta_and_cpu(llama_setting(switch_every=2, chunked_loss=False, inactive_update="sgd",
                                                  inactive_scope=scope, **keys), "badam")

    at_step, in_backward = run(), run(inactive_timing="backward")
    plain = run_method(llama_setting(switch_every=2, chunked_loss=False), "badam", "meta")
    h, i, kv, vocab = 64, 128, 32, 512
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    # Layers 1-3, final norm, head: alive at the backward's peak (with scope all the embeddings' gradient only
    # comes after it).
    inactive = 3 * layer + h + vocab * h
    later = at_step["steps"][1]
    assert later["phase"] == "backward" and later["alive_at_peak"]["gradients"] == 2 * inactive
    for s, ref in zip(in_backward["steps"][:2], at_step["steps"][:2]):
        assert "gradients" not in s["alive_at_peak"], s["step"]
        # at most the largest inactive gradient (the head's) alive at once
        assert s["phase_peaks"]["backward"] <= ref["phase_peaks"]["backward"] - 2 * inactive + 2 * vocab * h
    assert in_backward["peak_bytes"] < at_step["peak_bytes"]
    if scope == "above":  # the truncated backward BAdam runs anyway: nothing more than the flag
        assert in_backward["steps"][1]["phase_peaks"]["backward"] == plain["steps"][1]["phase_peaks"]["backward"] + 1
        # The run's peak (in the loss's backward) is BAdam's own, up to one bf16 tensor of an MLP matrix's size
        # (2 * h * i bytes) that some transformers releases keep alive there (5.18 and 5.25 do, 5.24 does not).
        assert 0 <= in_backward["peak_bytes"] - plain["peak_bytes"] <= 2 * h * i


@pytest.mark.parametrize("method", ["adamw", "lora"])
def test_adamw_and_lora_meta_equals_cpu_to_the_byte(method):
    res = same_on_meta_and_cpu(llama_setting(), method)
    assert len(res["steps"]) == 2


def test_sequence_classification_fp32_meta_equals_cpu():
    cfg = RobertaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=80, num_labels=2,
                        # with attention dropout CPU takes SDPA's math path; a CUDA run (and the dry run) does not
                        attention_probs_dropout_prob=0.0)
    setting = Setting(config=cfg, name="tiny-roberta", batch=2, seq=16, dtype=torch.float32,
                      task="sequence-classification", badam={"switch_every": 2, "always_active": ["classifier"]})
    res = same_on_meta_and_cpu(setting, "badam")
    # fp32 weights need no master: no masters and no low halves anywhere.
    for s in res["steps"]:
        assert "masters" not in s["alive_at_peak"] and "low halves" not in s["alive_at_peak"]


def _state():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return (F.scaled_dot_product_attention, optim_mod._get_fused_kernels_supported_devices,
            masking_utils.find_packed_sequence_indices, len(_get_current_dispatch_mode_stack()),
            torch.get_default_dtype(), torch.is_grad_enabled(), tuple(optim_mod._get_fused_kernels_supported_devices()))


def test_leaves_torch_and_transformers_as_found():
    before = _state()
    assert "meta" not in before[-1]
    with meta_workarounds():
        inside = _state()
        assert inside[0] is not before[0] and inside[1] is not before[1] and inside[2] is not before[2]
        assert "meta" in inside[-1]
    assert _state() == before
    run_method(llama_setting(switch_every=2), "badam", "meta")
    run_method(llama_setting(), "lora", "meta")
    assert _state() == before
    with pytest.raises(RuntimeError, match="boom"):
        with meta_workarounds():
            raise RuntimeError("boom")
    assert _state() == before


def test_flash_sdpa_on_meta_keeps_no_score_matrix():
    """On meta the attention is flash's: output + fp32 log-sum-exp, no (seq x seq) scores in fp32."""
    q = torch.empty(2, 4, 256, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k = torch.empty(2, 2, 256, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    counter = StorageCounter()
    with meta_workarounds(), counter:
        out = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        out.sum().backward()
    counter.finish()
    scores = 2 * 4 * 256 * 256 * 4
    assert counter.peak < scores
    assert out.shape == q.shape and k.grad.shape == k.shape


def test_counter_tells_meta_storages_apart_and_sees_frees():
    counter = StorageCounter()
    with counter:
        a = torch.empty(1000, device="meta")
        b = torch.empty(1000, device="meta")
        v = a.view(10, 100)  # a view: no new bytes
        assert counter.live_bytes() == 8000
        del a, v
        assert counter.live_bytes() == 4000
        c = b * 2
        assert counter.live_bytes() == 8000
        del b, c
    assert counter.peak == 8000 and counter.live_bytes() == 0


def test_cli_exact_json_schema(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **LLAMA}))
    out = tmp_path / "peaks.json"
    assert main(["estimate", str(path), "--exact", "--batch", "2", "--seq", "32", "--switch-every", "2",
                 "--methods", "badam,lora", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| BAdam | later step (K=2) |" in text and "512 bytes" in text
    doc = json.loads(out.read_text())
    assert set(doc) == {"model", "batch", "seq", "methods"} and (doc["batch"], doc["seq"]) == (2, 32)
    assert set(doc["methods"]) == {"badam", "lora"}
    for m in doc["methods"].values():
        assert set(m) == {"peak_bytes", "steps"}
        assert m["peak_bytes"] == max(s["peak_bytes"] for s in m["steps"])
        for s in m["steps"]:
            assert set(s) == {"step", "peak_bytes", "phase", "alive_at_peak"}
            assert sum(s["alive_at_peak"].values()) == s["peak_bytes"]
    # the same on real CPU tensors
    out_cpu = tmp_path / "cpu.json"
    assert main(["estimate", str(path), "--exact", "--batch", "2", "--seq", "32", "--switch-every", "2",
                 "--methods", "badam", "--device", "cpu", "--json", str(out_cpu)]) == 0
    assert json.loads(out_cpu.read_text())["methods"]["badam"] == doc["methods"]["badam"]


def test_cli_exact_refuses_bad_input(tmp_path, capsys):
    assert main(["estimate", "llama3-8b", "--exact", "--methods", "sgd"]) == 2
    assert "sgd" in capsys.readouterr().err
    assert main(["estimate", "llama3-8b", "--json", str(tmp_path / "x.json")]) == 2
    assert "--exact" in capsys.readouterr().err
    assert main(["estimate", "llama3-8b", "--exact", "--gpus", "4"]) == 2
    assert "one device" in capsys.readouterr().err
    assert main(["estimate", "llama3-8b", "--exact", "--batch", "0"]) == 2
    assert "batch=0" in capsys.readouterr().err
