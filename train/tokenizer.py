"""A byte-level BPE tokenizer for the default model, trained with the `tokenizers` library on the training side of
the by-file split (held-out files never shape the vocabulary).

    python -m train.tokenizer OUT_DIR --data '/usr/lib/python3.12/**/*.py' --exclude '*/site-packages/*'

OUT_DIR is a `PreTrainedTokenizerFast` folder (tokenizer.json, tokenizer_config.json) that `AutoTokenizer` loads
offline, with `<|endoftext|>` (EOS, also used for padding) and `<|mask|>` as special tokens 0 and 1.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from convert.cli import ArgumentParser, check_output_folder, run_cli

from .checkpoint import atomic_dir
from .data import add_data_arguments, find_files, read_text, split_by_file


EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


def train_tokenizer(files, vocab_size=8192, model_max_length=4096):
    """Byte-level BPE (GPT-2's pre-tokenizer: runs of spaces stay tokens, which suits indented code) over `files`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_text(path)[0] for path in files), trainer=trainer, length=len(files))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=model_max_length,
    )


def main(argv=None):
    parser = ArgumentParser(prog="python -m train.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="tokenizer folder to write")
    add_data_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    if args.vocab_size < 258:
        parser.error(f"--vocab-size must be at least 258 (256 bytes, 2 special tokens), got {args.vocab_size}.")
    return run_cli(parser.prog, write_tokenizer, args)


def write_tokenizer(args):
    """`python -m train.tokenizer`: checks OUT_DIR, trains on the training side of the split, writes atomically."""
    check_output_folder(args.out_dir, "OUT_DIR", renamed_into_place=True, overwrite=args.overwrite)
    split = split_by_file(find_files(args.data, args.include, args.exclude), args.heldout_fraction)
    tokenizer = train_tokenizer(split.train, args.vocab_size)
    with atomic_dir(args.out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        record = {"train_files": split.names(split.train), "heldout_files": split.names(split.heldout)}
        (tmp / "tokenizer_data.json").write_text(json.dumps(record, indent=1))
    print(
        f"trained on {len(split.train)} files ({len(split.heldout)} held out): vocab {len(tokenizer)}, "
        f"wrote {args.out_dir}"
    )


if __name__ == "__main__":
    sys.exit(main())
