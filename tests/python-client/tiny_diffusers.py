"""Tiny diffusers pipelines built from configs, with tokenizers written
here: no hub access.  test_pyclient_diffusers.py and tests/gpu's
gpu-diffusers.py save them and compare weightd.diffusers against
from_pretrained.

wan_pipeline(): Wan text-to-video (transformer, AutoencoderKLWan, UMT5
text encoder with tied embeddings, flow-matching scheduler, a word-level
tokenizer).  sd_pipeline(scratch): Stable Diffusion (UNet, AutoencoderKL,
CLIP text encoder, a CLIP tokenizer written into scratch, DDIM, no safety
checker).  WAN_CALL: the arguments of a two-step call making 5 frames of
16x16."""
import json

import torch
from diffusers import (AutoencoderKL, AutoencoderKLWan, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel, WanPipeline, WanTransformer3DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, UMT5Config,
                          UMT5EncoderModel)

WAN_CALL = dict(prompt="a red cat sits on the mat", negative_prompt="a blue dog", height=16, width=16, num_frames=5,
                num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16, output_type="pt")


def _wan_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in "a cat dog sits on the mat runs in park red blue".split():
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def wan_pipeline():
    torch.manual_seed(20261207)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    return WanPipeline(tokenizer=_wan_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _clip_tokenizer(folder):
    """A CLIP tokenizer over single characters (GPT-2's byte alphabet, no
    merges), written to folder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # the other bytes: U+0100 on, in order
            bs.append(b)
            cs.append(0x100 + len(bs) - 1 - 188)
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(vocab)


def sd_pipeline(scratch):
    tokenizer, vocab_size = _clip_tokenizer(scratch / "clip-tokenizer")
    torch.manual_seed(20261207)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                                hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                                num_hidden_layers=2, pad_token_id=1, vocab_size=vocab_size,
                                                max_position_embeddings=16))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
