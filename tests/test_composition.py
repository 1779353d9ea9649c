"""Models are compositions of the blocks: flow heads, variants that are recipes only, one plan per pass."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vla_blocks
from vla_blocks.conditioning import posemb_sincos, sincos_1d_table
from vla_blocks.heads import FlowHead
from vla_blocks.mot import AdaRMSNorm, Routing

import policy_helpers

VARIANTS = ("pi05-ear-l1-tiny", "halo-adarms-tiny")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_variant_recipes_are_named_by_no_python_file():
    root = Path(vla_blocks.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in VARIANTS:
            assert name not in text, f"{path} names the recipe {name}"


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny", "acot-tiny", "halo-tiny", *VARIANTS])
def test_every_flow_output_is_a_flow_head_and_its_modules_keep_upstream_names(name):
    model = vla_blocks.create_model(name)
    assert model.flow_heads and all(type(h) is FlowHead for h in model.flow_heads.values())
    state = dict(model.state_dict())
    for head in model.flow_heads.values():
        # every tensor of a head is in the checkpoint exactly once, under a top-level (upstream) name
        for t in (*head.parameters(), *head.buffers()):
            keys = [k for k, v in state.items() if v.data_ptr() == t.data_ptr() and v.shape == t.shape]
            assert len(keys) == 1 and keys[0].split(".")[0] in dict(model.named_children()), keys
    assert not any(k.startswith("flow_heads.") for k in state)


def test_ear_variant_trains_both_heads_with_l1_like_upstream_three_passes():
    """pi0.5 + EAR coarse head, no IAR, HALO's L1 loss: the composed loss equals upstream's three-pass
    computation with |·| in place of (·)² (the test_acot reference, kind switched)."""
    from test_acot import three_pass_loss
    model = policy_helpers.build("pi05-ear-l1-tiny")
    assert model.config.iar is None and not hasattr(model, "implicit_action_reasoner")
    assert model.flow_heads["coarse_actions"].flow.loss_kind == "l1"
    assert type(model.flow_heads["coarse_actions"]) is type(model.flow_heads["actions"])
    batch = policy_helpers.fixed_batch(model)
    loss, metrics = model(batch)
    ref, ref_ear, ref_act = three_pass_loss(model, batch, kind="l1")
    assert abs(loss.item() - ref.item()) <= 1e-5 and abs(metrics["loss_ear"].item() - ref_ear.item()) <= 1e-5
    mse, _, _ = three_pass_loss(model, batch)
    assert abs(mse.item() - ref.item()) > 1e-3  # the kind really switched


def test_halo_adarms_variant_conditions_the_action_expert_norms_on_pi05_time_mlp():
    torch.manual_seed(0)
    model = vla_blocks.create_model("halo-adarms-tiny")
    act = model.roles["action"]
    assert not hasattr(model, "action_time_embedder") and not any("action_time_embedder" in k for k in model.state_dict())
    assert isinstance(model.lm.stack.norms[act], AdaRMSNorm)
    assert not isinstance(model.lm.stack.norms["und"], AdaRMSNorm)
    head = model.flow_heads["action"]
    a_t, t = torch.randn(2, model.config.chunk_size, model.config.action_dim), torch.tensor([0.25, 0.9])
    embeds, cond = model.embed_action(a_t, t)
    # openpi pi0.5 time MLP (pi0.py L180-190) and HALO's token embedding without its additive time term
    W = head.width
    ref_cond = F.silu(F.linear(F.silu(F.linear(posemb_sincos(t, W), model.action_time_mlp_in.weight,
                                                model.action_time_mlp_in.bias)),
                               model.action_time_mlp_out.weight, model.action_time_mlp_out.bias))
    ref_tok = F.linear(a_t, model.input_linear_layer.weight, model.input_linear_layer.bias) + \
        sincos_1d_table(a_t.shape[1], W)
    torch.testing.assert_close(embeds["action"], ref_tok.reshape(-1, W), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["action"], ref_cond[:, None].expand(2, a_t.shape[1], W).reshape(-1, W),
                               rtol=0, atol=1e-6)
    # the condition reaches the loss: once the zero-initialised adaRMS layers are woken, the time MLP gets gradients
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".dense." in n or n.startswith("output_linear_layer."):  # both zero-initialised
                p.normal_(0, 0.05)
    batch = model.demo_batch(2, torch.Generator().manual_seed(0))
    loss, _ = model(batch)
    loss.backward()
    assert model.action_time_mlp_in.weight.grad.abs().max() > 0


@pytest.mark.parametrize("name", ["pi0-tiny", "acot-tiny"])
def test_flow_loop_builds_its_pass_plan_once(name, monkeypatch):
    """Every Euler step reuses one plan: routing is built once for the prefix and once per flow head."""
    model = policy_helpers.build(name)
    batch = policy_helpers.fixed_batch(model)
    calls = []
    real = Routing.from_layout.__func__
    monkeypatch.setattr(Routing, "from_layout", classmethod(lambda cls, lay: calls.append(1) or real(cls, lay)))
    with torch.no_grad():
        model.sample_actions(batch, generator=torch.Generator().manual_seed(0), num_steps=6)
    assert len(calls) == 1 + len(model.flow_heads)


def test_pass_plan_gives_the_same_pass_as_the_layout():
    model = policy_helpers.build("pi05-tiny")
    batch = policy_helpers.fixed_batch(model)
    prefix = model.embed_prefix(batch)
    _, cache = model.run_prefix(prefix)
    plan = model.plan_suffixes(prefix, [("act", "actions", model.config.action_horizon, False)])
    s = model.head_suffix("actions", batch["noise"], batch["time"])
    B, H, W = s.tokens.shape
    hidden = plan.sub.assemble({"actions": s.tokens.reshape(B * H, W)})
    cond = plan.sub.assemble({"actions": s.cond[:, None].expand(B, H, -1).reshape(B * H, -1)}, partial=True)
    a = model.stack(hidden, plan=plan, cache=cache, cond=cond).hidden["act"]
    b = model.stack(hidden, plan.layout, start=plan.start, cache=cache, cond=cond).hidden["act"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="layout or a plan"):
        model.stack(hidden, cache=cache)


def test_expose_refuses_a_block_with_an_unnamed_tensor():
    model = vla_blocks.create_model("pi0-tiny")
    head = FlowHead(8, 16, time="adarms")
    with pytest.raises(ValueError, match="no upstream name"):
        model.expose(head, {"proj.in_proj": "x_in", "proj.out_proj": "x_out"})
