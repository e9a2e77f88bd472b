"""A stock Hugging Face training script: HfArgumentParser + plain `transformers.Trainer`.

It deliberately does not import badam_hf: tests run it through `python -m badam_hf.run` to show that an
unmodified script accepts `--optim badam`. It builds a tiny Llama and a synthetic dataset locally, trains,
and writes `result.json` to the output folder (optimizer class, log history, parameters changed vs init).
"""

import json
import os
from dataclasses import dataclass

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@dataclass
class ModelArgs:
    num_layers: int = 4
    hidden_size: int = 32
    vocab_size: int = 64
    seq_len: int = 16
    num_examples: int = 32


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n, seq_len, vocab_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def main():
    model_args, training_args = HfArgumentParser((ModelArgs, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(training_args.seed)
    config = LlamaConfig(
        vocab_size=model_args.vocab_size,
        hidden_size=model_args.hidden_size,
        intermediate_size=2 * model_args.hidden_size,
        num_hidden_layers=model_args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = TokenDataset(model_args.num_examples, model_args.seq_len, model_args.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    trainer.train()

    opt = trainer.optimizer
    while hasattr(opt, "optimizer") and not hasattr(opt, "active_block"):
        opt = opt.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
    result = {
        "optimizer": type(opt).__name__,
        "log_history": trainer.state.log_history,
        "changed": sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), init[n])),
        "params": sorted(init),
    }
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "result.json"), "w") as f:
        json.dump(result, f)
    print(json.dumps({"optimizer": result["optimizer"], "changed": len(result["changed"])}))


if __name__ == "__main__":
    main()
