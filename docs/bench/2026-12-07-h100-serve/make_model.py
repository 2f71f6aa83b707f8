import sys, glob, torch
from pathlib import Path
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
files = [f for f in glob.glob("**/*.md", recursive=True) + glob.glob("spd_jax/**/*.py", recursive=True)]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train(files, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
fast.save_pretrained(out)
cfg = LlamaConfig(vocab_size=len(fast), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(out)
print("params", sum(p.numel() for p in m.parameters()) / 1e9, "B; vocab", len(fast))
