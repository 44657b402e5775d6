"""A random Llama-style checkpoint and an offline tokenizer, in the layout of
a Hugging Face model folder (config.json, model*.safetensors, an index when
sharded, tokenizer.json, tokenizer_config.json), for running vLLM without
the hub.  Fixed seed: the same arguments give the same bytes.

    make_llama(folder, hidden=64, layers=2, vocab=512, dtype="float32")
"""
import json
import pathlib

WORDS = [f"w{i}" for i in range(64)]
SPECIALS = ["<unk>", "<s>", "</s>"]


def make_tokenizer(folder, vocab):
    """A WordLevel tokenizer over SPECIALS + WORDS (+ fillers up to vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    names = SPECIALS + WORDS
    names += [f"x{i}" for i in range(vocab - len(names))]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": 4096, "add_bos_token": False}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))


def llama_tensors(hidden, layers, vocab, intermediate, heads, kv_heads):
    """[(name, shape)] of a Llama checkpoint, in the order HF writes it."""
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def make_llama(folder, hidden=64, layers=2, vocab=512, intermediate=None, heads=4, kv_heads=2,
               dtype="float32", shard_bytes=None, seed=0):
    """Write the model into folder (created); returns folder as a Path."""
    import torch
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    intermediate = intermediate or 2 * hidden
    tdtype = getattr(torch, dtype)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2}))
    make_tokenizer(folder, vocab)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape in llama_tensors(hidden, layers, vocab, intermediate, heads, kv_heads):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
        t = t.to(tdtype)
        if shard_bytes and current and size + t.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.nbytes
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder
