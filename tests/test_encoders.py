"""Vision towers, connector, preprocessing and the FLUX VAE against transformers / diffusers (tiny configs)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vla_blocks.config import ConfigError, decode
from vla_blocks.encoders import (FLUX_VAE_CONFIG, Connector, FluxVAE, Siglip2NaViT, SiglipVision, VAEConfig,
                                 VisionConfig, navit_size, patchify_images_navit, preprocess_images)
from vla_blocks.heads import VisualLatentHead

from oracles.nn import siglip_vision_model
from oracles.openpi import resize_with_pad

SIGLIP = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=28,
              patch_size=14)
SIGLIP2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
               num_patches=16)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_uint8(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=gen(seed), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_same_size_is_exact_scaling():
    img = rand_uint8(2, 28, 28, 3)
    out = preprocess_images(img, size=28)
    torch.testing.assert_close(out, img.permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    f = torch.rand(2, 3, 28, 28, generator=gen(1))
    torch.testing.assert_close(preprocess_images(f, size=28), f * 2 - 1)
    torch.testing.assert_close(preprocess_images(f * 2 - 1, size=28, float_range="signed"), f * 2 - 1)


def test_preprocess_resize_with_pad_matches_openpi():
    img = rand_uint8(2, 40, 21, 3, seed=2)
    out = preprocess_images(img, size=28)
    ref = resize_with_pad(img, 28, 28) / 255 * 2 - 1
    torch.testing.assert_close(out, ref)
    # 40×21 → 28×14 (int(21/ (40/28)) = 14), padded 7 | 7 columns of black (−1)
    assert torch.equal(out[..., :7], -torch.ones(2, 3, 28, 7)) and torch.equal(out[..., 21:], -torch.ones(2, 3, 28, 7))
    assert out[..., 7:21].gt(-1).any()


def test_preprocess_bad_input():
    with pytest.raises(ValueError, match="3 channels"):
        preprocess_images(torch.zeros(1, 10, 10, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        preprocess_images(torch.full((1, 3, 8, 8), float("nan")), size=8)
    with pytest.raises(TypeError):
        preprocess_images(torch.zeros(1, 8, 8, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        preprocess_images(torch.zeros(8, 3))


# ---------------------------------------------------------------------------------------------- SigLIP
def reference_siglip(enc):
    """transformers' SigLIP vision model (oracles.nn) at SIGLIP's config with ``enc``'s weights."""
    return siglip_vision_model(SIGLIP, enc.model.state_dict())


def test_siglip_features_match_transformers():
    torch.manual_seed(0)
    enc = SiglipVision(config=SIGLIP).build().eval()
    ref, missing, unexpected = reference_siglip(enc)
    assert not missing and not unexpected
    px = preprocess_images(rand_uint8(2, 50, 36, 3), size=28)
    with torch.no_grad():
        torch.testing.assert_close(enc(px), ref(pixel_values=px).last_hidden_state)
    assert enc.out_dim == 32 and enc.num_tokens == 4


def test_siglip_truncation_and_pre_norm_features():
    torch.manual_seed(0)
    enc = SiglipVision(config=SIGLIP, num_layers=2).build().eval()
    assert len(enc.model.encoder.layers) == 2
    ref, missing, _ = reference_siglip(enc)
    assert all(k.startswith("encoder.layers.2.") for k in missing)  # only the dropped layer is missing
    px = preprocess_images(rand_uint8(1, 28, 28, 3), size=28)
    with torch.no_grad():
        hs = ref(pixel_values=px, output_hidden_states=True).hidden_states
        torch.testing.assert_close(enc(px), ref.post_layernorm(hs[2]))
        pre = SiglipVision(config=SIGLIP, num_layers=2, post_layernorm=False).build().eval()
        pre.load_state_dict(enc.state_dict())
        torch.testing.assert_close(pre(px), hs[2])


def test_siglip_224_patch14_gives_256_tokens():
    cfg = {**SIGLIP, "image_size": 224, "num_hidden_layers": 1}
    enc = SiglipVision(config=cfg).build().eval()
    px = preprocess_images(rand_uint8(1, 240, 320, 3), size=224)
    with torch.no_grad():
        out = enc(px)
    assert enc.num_tokens == 256 and out.shape == (1, 256, 32)


def test_siglip_bad_input_and_config():
    enc = SiglipVision(config=SIGLIP).build()
    with pytest.raises(ValueError, match="28"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="exactly one"):
        SiglipVision().build()
    with pytest.raises(ValueError, match="num_layers"):
        SiglipVision(config=SIGLIP, num_layers=9).build()
    with pytest.raises(ValueError, match="bad config"):
        SiglipVision(config={"hidden_sizes": 3}).build()


def test_vision_registry_decodes_from_recipe_data():
    v = decode(VisionConfig, {"type": "siglip", "config": SIGLIP, "num_layers": 1})
    assert isinstance(v, SiglipVision) and v.num_layers == 1
    assert isinstance(decode(VisionConfig, {"type": "siglip2_navit", "config": SIGLIP2}), Siglip2NaViT)
    with pytest.raises(ConfigError, match="siglip"):
        decode(VisionConfig, {"type": "siglp"})


# ---------------------------------------------------------------------------------------------- SigLIP2 NaViT
def test_navit_size_and_patch_order_match_transformers():
    ip = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    for H, W, p, m in ((30, 50, 4, 20), (224, 224, 16, 256), (17, 300, 14, 64), (5, 5, 16, 256)):
        assert navit_size(H, W, p, m) == tuple(ip.get_image_size_for_max_num_patches(H, W, p, m))
    img = torch.rand(3, 12, 8, generator=gen(0))
    pv, mask, shapes = patchify_images_navit([img], 4, 6)  # 12×8 with ≤ 6 patches of 4 keeps its size
    assert shapes.tolist() == [[3, 2]] and mask.sum() == 6
    ref = ip.convert_image_to_patches(img.numpy() * 2 - 1, 4)
    np.testing.assert_allclose(pv[0].numpy(), ref, atol=1e-6)


def test_navit_preprocessing_close_to_transformers_processor():
    ip = pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2")
    Image = pytest.importorskip("PIL.Image")
    imgs = [rand_uint8(30, 50, 3, seed=1), rand_uint8(64, 20, 3, seed=2)]
    proc = ip.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=20)
    ref = proc([Image.fromarray(i.numpy()) for i in imgs], return_tensors="pt")
    pv, mask, shapes = patchify_images_navit(imgs, 4, 20)
    assert torch.equal(shapes, ref["spatial_shapes"]) and torch.equal(mask, ref["pixel_attention_mask"].bool())
    # PIL's bilinear filter vs torch's antialiased bilinear: a few grey levels apart
    diff = (pv - ref["pixel_values"])[mask].abs()
    assert diff.mean() < 0.02 and diff.max() < 0.25


def test_siglip2_navit_features_match_transformers_and_pack():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    torch.manual_seed(0)
    enc = Siglip2NaViT(config=SIGLIP2, max_num_patches=20).build().eval()
    ref = Siglip2VisionModel(Siglip2VisionConfig(**{**SIGLIP2, "vision_use_head": False})).eval()
    missing, unexpected = ref.load_state_dict(enc.model.state_dict(), strict=False)
    assert not missing and not unexpected
    imgs = [rand_uint8(30, 50, 3, seed=1), torch.rand(3, 20, 20, generator=gen(2))]
    pv, mask, shapes = patchify_images_navit(imgs, 4, 20)
    with torch.no_grad():
        out = enc(imgs)
        full = ref(pixel_values=pv, pixel_attention_mask=mask.long(), spatial_shapes=shapes).last_hidden_state
    assert out.counts.tolist() == [int(h * w) for h, w in shapes.tolist()] == [15, 16]
    torch.testing.assert_close(out.features, full[mask])
    torch.testing.assert_close(out.grids, shapes)
    # packing is per image: each image alone gives its own slice
    with torch.no_grad():
        alone = enc([imgs[1]])
    torch.testing.assert_close(alone.features, out.features[15:], atol=1e-5, rtol=1e-5)


def test_siglip2_bad_input():
    enc = Siglip2NaViT(config=SIGLIP2, max_num_patches=20).build()
    with pytest.raises(ValueError):
        enc([torch.zeros(5, 5)])
    with pytest.raises(ValueError, match="no images"):
        enc([])
    with pytest.raises(ValueError, match="pixel_values"):
        enc.forward_patches(torch.zeros(1, 20, 47), torch.ones(1, 20), torch.tensor([[4, 5]]))


# ---------------------------------------------------------------------------------------------- connector
def test_connector_values():
    c = Connector(12, 20)
    x = torch.randn(2, 5, 12, generator=gen(0))
    ref = F.linear(F.gelu(F.linear(x, c.fc1.weight, c.fc1.bias), approximate="tanh"), c.fc2.weight, c.fc2.bias)
    torch.testing.assert_close(c(x), ref)
    assert sorted(c.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    lin = Connector(12, 20, kind="linear")
    torch.testing.assert_close(lin(x), F.linear(x, lin.linear.weight, lin.linear.bias))
    with pytest.raises(ValueError):
        Connector(12, 20, kind="qformer")
    with pytest.raises(ValueError):
        c(torch.zeros(2, 11))


# ---------------------------------------------------------------------------------------------- FLUX VAE
def test_flux_vae_scaling_matches_diffusers_and_round_trips_through_patchify():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = FluxVAE(config=TINY_VAE).build().eval()
    ref = AutoencoderKL(**TINY_VAE).eval()
    ref.load_state_dict(vae.vae.state_dict())
    px = torch.rand(2, 3, 16, 12, generator=gen(1)) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(px)
        mean = ref.encode(px).latent_dist.mean
        torch.testing.assert_close(lat, 0.3611 * (mean - 0.1159))
        assert lat.shape == (2, 16, 8, 6) and vae.downsample == 2
        head = VisualLatentHead(32, max_latent_size=8)
        tok = head.patchify(lat)
        back = head.unpatchify(tok, 4, 3)
        torch.testing.assert_close(back, lat, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode(back), ref.decode(mean).sample, atol=1e-5, rtol=1e-4)


def test_flux_vae_config_is_flux_shaped():
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        m = AutoencoderKL(**FLUX_VAE_CONFIG)
    assert m.config.latent_channels == 16 and 2 ** (len(m.config.block_out_channels) - 1) == 8
    assert m.encoder.conv_out.out_channels == 32  # mean and log-variance of 16 channels
    assert m.quant_conv is None and m.post_quant_conv is None
    assert FLUX_VAE_CONFIG["scaling_factor"] == FluxVAE().scaling_factor
    assert FLUX_VAE_CONFIG["shift_factor"] == FluxVAE().shift_factor


def test_flux_vae_bad_input():
    vae = FluxVAE(config=TINY_VAE).build()
    with pytest.raises(ValueError, match="multiple"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="exactly one"):
        FluxVAE().build()
    assert isinstance(decode(VAEConfig, {"type": "flux_vae", "config": TINY_VAE}), FluxVAE)


def test_import_stays_light():
    code = ("import sys, vla_blocks.flow, vla_blocks.conditioning, vla_blocks.heads, vla_blocks.encoders; "
            "bad = [m for m in ('transformers', 'diffusers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
