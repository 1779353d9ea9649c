"""HALO sequences exactly as upstream builds them (issue 14, items 1–6), on randomized samples (hypothesis),
against hand-written references of HALO's ``robotwin_dataset.py`` / ``transforms.py`` and BAGEL's
``pack_sequence`` in tests/oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles.bagel import image_transform_size, pack_positions, prepare_attention_mask_per_sample
from oracles.halo import robotwin_elements, robotwin_plan, robotwin_prompt, robotwin_thought
from vla_blocks import model_config
from vla_blocks.layout import Layout, Part, RopeSkip, Segment
from vla_blocks.models.halo import HaloCondDropout, HaloSample, format_prompt, format_thought
from vla_blocks.models.halo.plans import item_segment
from vla_blocks.models.halo.transforms import bagel_resize_size

A, CHUNK = 14, 16
SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return model_config("halo-tiny").build().eval()


@pytest.fixture(scope="module")
def bagel_vit_model():
    torch.manual_seed(0)  # halo-tiny's ViT: patch 8, ≤ 16 patches → HALO's rule at max 32 / min 16
    return model_config("halo-tiny", vit_resize="bagel", vit_max_size=32, vit_min_size=16).build().eval()


# ---------------------------------------------------------------------------------------------- items 3, 4: text
line = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(line, max_size=5), line, line, line)
def test_thought_text_is_halo_byte_for_byte(plan, subtask, left, right):
    assert format_thought(plan, subtask, left, right) == robotwin_thought(plan, subtask, left, right)


def test_thought_text_example():
    got = format_thought(["pick the cup", "place it"], "pick the cup", "Move left.", "Stay.")
    assert got == ("\n<|plan|>\npick the cup\nplace it\n<|\\ plan|>\n\n<|subtask|>\npick the cup\n<|\\ subtask|>\n\n"
                   "<|movement|>\n[LEFT]: Move left.\n[RIGHT]: Stay.\n\n<|\\ movement|>\n\n")
    with pytest.raises(TypeError, match="sequence of subtask strings"):
        format_thought("one string", "s", "l", "r")


@settings(max_examples=80, deadline=None)
@given(st.text(st.sampled_from(list("aBc .\t\nÄ!")), max_size=20))
def test_prompt_only_lowercases_and_strips_trailing_dots(instruction):
    assert format_prompt(instruction) == robotwin_prompt(instruction)


def test_prompt_keeps_surrounding_whitespace():
    got = format_prompt("  Pick UP the cup..")
    assert got == "You are an embodied agent. Your task is to:   pick up the cup. Plan and act."
    assert format_prompt("Stack. ") == "You are an embodied agent. Your task is to: stack. . Plan and act."


# ---------------------------------------------------------------------------------------------- item 5: grids
def test_image_sizes_of_the_issue_and_the_reference():
    # issue 14 item 5 and halo_bagel.md §5.3 (a 320×240 frame: 688×512 VAE, 504×378 ViT)
    assert bagel_resize_size(73, 194, 1024, 512, 16) == (384, 1024)
    assert bagel_resize_size(77, 136, 1024, 512, 16) == (512, 896)
    assert bagel_resize_size(240, 320, 1024, 512, 16) == (512, 688)
    assert bagel_resize_size(240, 320, 980, 378, 14) == (378, 504)
    with pytest.raises(ValueError, match="stride"):
        bagel_resize_size(10, 10, 64, 32, 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000), st.sampled_from([(1024, 512, 16), (980, 378, 14), (64, 32, 16)]),
       st.sampled_from([14 * 14 * 9 * 1024, 200_000]))
def test_bagel_resize_size_matches_image_transform(h, w, geometry, max_pixels):
    mx, mn, stride = geometry
    assert bagel_resize_size(h, w, mx, mn, stride, max_pixels) == image_transform_size(h, w, mx, mn, stride, max_pixels)


@settings(**SETTINGS)
@given(st.integers(4, 300), st.integers(4, 300))
def test_model_vae_and_vit_sizes_follow_halo_transforms(model, bagel_vit_model, h, w):
    c = model.config
    assert model.vae_size(h, w) == image_transform_size(h, w, c.vae_max_side, c.vae_min_side, 16)
    assert model.latent_grid(torch.zeros(3, h, w)) == tuple(v // 16 for v in model.vae_size(h, w))
    th, tw = image_transform_size(h, w, 32, 16, 8)
    assert bagel_vit_model.vit_grid(torch.zeros(3, h, w)) == (th // 8, tw // 8)


def test_bagel_vit_resize_embeds_at_the_transform_grid(bagel_vit_model):
    frames = [torch.rand(3, 20, 70), torch.rand(3, 33, 31)]
    x = bagel_vit_model.embed_vit(frames)
    n = sum(a * b for a, b in (bagel_vit_model.vit_grid(f) for f in frames))
    assert x.shape[0] == n and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="max_num_patches"):
        model_config("halo-tiny", vit_resize="bagel", vit_max_size=64, vit_min_size=32).build().vit_grid(
            torch.zeros(3, 64, 64))


# ---------------------------------------------------------------------------------------------- items 1, 2: plans
_KIND = {"vit_image": "vit", "action": "action", "text": "text"}


def _reference(model, sample, use_subtask, drops):
    """Splits ``(length, mode)`` and RoPE ids of ``sample`` by the references: HALO's change_format + plan loop,
    then BAGEL's pack_sequence with the given condition-dropout decisions (one per droppable item, in plan order:
    the history images, then the prompt)."""
    tok, goal = model.tokenizer, sample.goal is not None
    texts = [tok.encode(format_prompt(sample.instruction))] + ([tok.encode(sample.thought)] if use_subtask else [])
    n_loaded = len(sample.history) + 1  # HALO loads history + 1 frames: the goal, or the current frame it leaves out
    plan = robotwin_plan(robotwin_elements(n_loaded, use_subtask, goal), goal, [len(t) for t in texts])
    drops, texts = list(drops), list(texts)
    items, splits, hist_i, after_text = [], [], 0, False
    for kind, loss in plan:
        if kind == "text":
            ids = texts.pop(0)
            first = not after_text
            after_text = True
            if first and drops.pop(0):  # the prompt is droppable (enable_cfg), the thought is not
                continue
            items.append(("text", len(ids) + 2))
            splits.append((len(ids) + 2, "causal"))
        elif kind == "action":
            items.append(("action", CHUNK + 2))
            splits.append((CHUNK + 2, "noise"))
        else:
            img = sample.goal if after_text else sample.history[hist_i]
            if not after_text and kind == "vit_image":
                hist_i += 1
            if not after_text and drops.pop(0):
                items.append(("skip", 0))
                continue
            gh, gw = model.latent_grid(img) if kind == "vae_image" else model.vit_grid(img)
            n = gh * gw + 2
            items.append(("vae_noisy" if loss else "vae", n) if kind == "vae_image" else ("vit", n))
            splits.append((n, "noise" if loss else "full"))
    assert not drops
    return splits, pack_positions(items)


def _frame(draw, g):
    h, w = draw(st.integers(12, 48)), draw(st.integers(12, 48))
    return torch.rand(3, h, w, generator=g)


@settings(**SETTINGS)
@given(st.data())
def test_sequence_plan_matches_halo_robotwin_and_bagel_pack_sequence(model, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    history = [_frame(data.draw, g) for _ in range(data.draw(st.integers(1, 3)))]
    use_subtask, use_goal = data.draw(st.booleans()), data.draw(st.booleans())
    thought = format_thought(["pick the cup"], "pick the cup", "Move up.", "Stay.") if use_subtask else None
    goal = _frame(data.draw, g) if use_goal else None
    instruction = data.draw(st.sampled_from(["Pick up the cup.", "stack blocks", "Open the drawer..."]))
    sample = HaloSample(history, instruction, torch.rand(CHUNK, A, generator=g), thought=thought, goal=goal)
    p = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    seed = data.draw(st.integers(0, 1000))
    plan = model.sequence_plan(sample, HaloCondDropout(text=p, vit=p, vae=p), torch.Generator().manual_seed(seed))
    layout = Layout.from_samples([[item_segment(it, model.roles) for it in plan]], model.experts)
    # the dropout decisions: one uniform draw per droppable item in plan order (BAGEL: random() < prob drops)
    n_drawn = len(history) * (2 if use_goal else 1) + 1
    u = torch.rand(n_drawn, generator=torch.Generator().manual_seed(seed)) if p > 0 else torch.ones(n_drawn)
    drops = [bool(x < p) for x in u]  # history images first, the prompt last (the order of the plan)
    splits, rope = _reference(model, sample, use_subtask, drops)
    seg = layout.seg_id[0].tolist()
    got = []
    for s in sorted(set(seg)):
        idx = [i for i, v in enumerate(seg) if v == s]
        got.append((len(idx), ("causal", "full", "noise")[layout.seg_mode[0, idx[0]].item()]))
    assert got == splits
    assert layout.position_ids[0].tolist() == rope
    assert torch.equal(layout.dense_mask()[0], prepare_attention_mask_per_sample([n for n, _ in splits],
                                                                                 [m for _, m in splits]))


def test_thought_without_goal_has_no_vae_history(model):
    s = HaloSample([torch.rand(3, 32, 32)] * 2, "Pick.", torch.rand(CHUNK, A), thought="\n<|plan|>\nx\n")
    assert [it.kind for it in model.sequence_plan(s)] == ["vit", "vit", "text", "text", "action"]
    s.goal = torch.rand(3, 32, 32)
    assert [it.kind for it in model.sequence_plan(s)] == ["vae", "vit", "vae", "vit", "text", "text", "vae_noisy",
                                                           "vae", "vit", "action"]


def test_dropped_images_advance_rope_by_one_and_text_by_nothing(model):
    s = HaloSample([torch.rand(3, 32, 32)], "Pick.", torch.rand(CHUNK, A))
    kept = model.collate([s], cond_dropout=False)["layout"]
    m = model_config("halo-tiny", **{"cond_dropout.vit": 1.0}).build().train()
    dropped = m.collate([s])["layout"]
    # ViT dropped: the prompt starts at RoPE id 1 as it does with the image (one id per image)
    n_vit = kept.seq_len - dropped.seq_len
    assert dropped.position_ids[0].tolist() == kept.position_ids[0, n_vit:].tolist()
    m = model_config("halo-tiny", **{"cond_dropout.text": 1.0}).build().train()
    no_text = m.collate([s])["layout"]
    assert no_text.position_ids[0, -1].item() == 1  # the action block right after the one ViT image


# ---------------------------------------------------------------------------------------------- item 6: layout
@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("text"), st.integers(1, 5)), st.tuples(st.just("vit"), st.integers(1, 5)),
                          st.tuples(st.just("action"), st.integers(1, 5)), st.tuples(st.just("skip"), st.just(0)),
                          st.tuples(st.just("video"), st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)),
                                                               min_size=1, max_size=3))),
                min_size=1, max_size=6).filter(lambda items: any(k != "skip" for k, _ in items)))
def test_layout_rope_skip_and_video_frames_follow_pack_sequence(items):
    sample = []
    for kind, n in items:
        if kind == "text":
            sample.append(Segment.of("causal", "und", n, "text"))
        elif kind == "vit":
            sample.append(Segment.of("full", "und", n, "vit", rope="block"))
        elif kind == "action":
            sample.append(Segment.of("noise", "act", n, "action", rope="block_hold"))
        elif kind == "skip":
            sample.append(RopeSkip(1))
        else:
            total = sum(f for f, _ in n)
            sample.append(Segment("full", [Part("gen", total, "latent")], rope="block", frames=n))
    layout = Layout.from_samples([sample], ["und", "gen", "act"])
    assert layout.position_ids[0].tolist() == pack_positions(items)


def test_layout_construct_errors_name_the_problem():
    with pytest.raises(ValueError, match="frames cover 3 tokens"):
        Segment("full", [Part("gen", 4, "latent")], rope="block", frames=[(3, 1)])
    with pytest.raises(ValueError, match="need rope 'block'"):
        Segment("causal", [Part("und", 3, "text")], frames=[(3, 1)])
    with pytest.raises(ValueError, match="RopeSkip.n"):
        RopeSkip(-1)
