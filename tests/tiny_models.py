"""Tiny random causal LMs built offline, in the two families users name: Llama and OPT.

The tokenizer is a byte-level BPE trained on a few sentences, so any text
round-trips (no unknown tokens) exactly as with a real model's tokenizer.
- Llama: `<s>` BOS, `</s>` EOS, no pad token (the loader falls back to EOS),
  optionally a ChatML chat template (as SmolLM2 has).
- OPT: `<pad>` = 1 and `</s>` = 2 as both BOS and EOS, added in front of every
  encoding by the post-processor, as facebook/opt-* tokenizers do.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The capital of France is Paris. Paris is a city in France.",
    "Harry Potter is a wizard. Hermione Granger and Ron Weasley are his friends at Hogwarts.",
    "What is two plus two? Two plus two equals four. The sky is blue and grass is green.",
    "I can't help with that. Bees make honey. Water boils at one hundred degrees.",
    "Question Answer system user assistant You are a helpful assistant.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()#\n",
]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bpe(special_tokens: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_tokenizer(chat_template: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    tok = _bpe(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "<|im_end|>" if chat_template else "</s>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat_template:
        fast.chat_template = CHATML
    return fast


def sentencepiece_tokenizer(eos_token: str = "<|im_end|>"):
    """A Llama/Mistral-style fast tokenizer: BPE over a Metaspace pre-tokenizer that writes "▁" for a space and
    before a text's first word (prepend_scheme "first", as transformers' LlamaTokenizer), `<s>` added in front,
    and the ChatML template. EOS_TOKEN: the template's `<|im_end|>`, or `<|endoftext|>`
    (a tokenizer whose EOS is not the token that ends a turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token=eos_token)
    fast.chat_template = CHATML
    return fast


def opt_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_llama(path: Path, chat_template: bool = True, seed: int = 0, tokenizer=None) -> Path:
    """TOKENIZER: another tokenizer for the model (e.g. `sentencepiece_tokenizer()`); default `llama_tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or llama_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def build_opt(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tok = opt_tokenizer()
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=512, pad_token_id=1, bos_token_id=2,
                       eos_token_id=2, enable_bias=True, do_layer_norm_before=True)
    OPTForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def build_family(path: Path, family: str, sliding_window: int | None = None, seed: int = 0) -> Path:
    """A tiny random model of another family users bring (2 layers, hidden 32), with the llama tokenizer and
    its chat template: FAMILY is one of gemma, gemma2, falcon, phi3, gptj, gpt2, gptneo, mistral, mixtral
    (SLIDING_WINDOW: the attention window of gemma2, mistral and GPT-Neo's local layers, in tokens)."""
    import torch
    import transformers as t

    tok = llama_tokenizer(True)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=None)  # Phi-3's default pad id (32000) lies past this vocabulary
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, **ids)
    make = {
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(head_dim=8, **llama_like)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(head_dim=8, sliding_window=sliding_window, **llama_like)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(head_dim=8, sliding_window=sliding_window,
                                                                 **llama_like)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(original_max_position_embeddings=512, **llama_like)),
        # a mixture of experts: transformers 5 keeps the experts' projections as fused 3-D parameters
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                **llama_like)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=512, **ids)),
        "gptj": lambda: t.GPTJForCausalLM(t.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512,
                                                       tie_word_embeddings=False, **ids)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)),
        "gptneo": lambda: t.GPTNeoForCausalLM(t.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                             attention_types=[[["global", "local"], 1]],
                                                             window_size=sliding_window or 256,
                                                             max_position_embeddings=512, **ids)),
    }[family]
    torch.manual_seed(seed)
    make().save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def build_gemma3_image_text(path: Path, seed: int = 0) -> Path:
    """A tiny random Gemma 3 image-and-text checkpoint (`Gemma3ForConditionalGeneration`: 2 text layers, hidden 32, a
    one-layer vision tower), with the llama tokenizer: its text model's width and depth sit under `text_config`."""
    import torch
    import transformers as t

    tok = llama_tokenizer(True)
    text = t.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=64,
                              vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=0)
    vision = t.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    torch.manual_seed(seed)
    t.Gemma3ForConditionalGeneration(t.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    mm_tokens_per_image=4)).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
