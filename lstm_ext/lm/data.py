"""Corpora for language modelling: reading, cleaning, tokenising (characters or words), the
train/valid/test split, and batches for truncated backpropagation through time."""

import hashlib
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<eos>"
UNK = "<unk>"
LEVELS = ("char", "word")
SPLITS = ("train", "valid", "test")

# The default corpus: the Python standard library's own source, present wherever Python is,
# read in a fixed order so every machine with the same Python gets the same text.
DEFAULT_CORPUS_MODULES = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py", "fractions.py",
    "functools.py", "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pathlib.py", "pickle.py", "pprint.py", "random.py", "shutil.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "typing.py",
    "unittest/case.py", "zipfile.py",
)


class Vocabulary:
    """Tokens <-> ids. Built from the training split; tokens never seen there map to UNK."""

    def __init__(self, tokens):
        self.itos = [UNK] + sorted(set(tokens) - {UNK})
        self.stoi = {token: index for index, token in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        unknown = self.stoi[UNK]
        return torch.tensor([self.stoi.get(token, unknown) for token in tokens], dtype=torch.long)

    def state_dict(self):
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state):
        vocabulary = cls.__new__(cls)
        vocabulary.itos = list(state["itos"])
        vocabulary.stoi = {token: index for index, token in enumerate(vocabulary.itos)}
        return vocabulary


@dataclass
class Corpus:
    vocabulary: Vocabulary
    level: str
    train: torch.Tensor  # token ids, 1-D int64
    valid: torch.Tensor
    test: torch.Tensor
    source: str          # where the text came from, for logs and checkpoints


def fingerprint(corpus):
    """A digest of the encoded splits: a resumed run checks that it reads the data it was
    trained on (a changed file, or the default corpus of another Python version, would shift
    every window the checkpoint's position points at)."""
    digest = hashlib.sha256()
    for ids in (corpus.train, corpus.valid, corpus.test):
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def clean(text):
    """Unicode NFC, Unix line ends, no control characters but newline and tab, no trailing
    spaces."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def tokenize(text, level):
    """Characters, or whitespace-separated words with an end-of-line token per line (the
    PTB/WikiText convention)."""
    if level == "char":
        return list(text)
    tokens = []
    for line in text.split("\n"):
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def default_corpus_text():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text(encoding="utf-8") for name in DEFAULT_CORPUS_MODULES
             if (stdlib / name).is_file()]
    if not parts:
        raise FileNotFoundError(f"the default corpus (the standard library's source under "
                                f"{stdlib}) is missing; pass --data")
    return "\n".join(parts)


def _split_file_names(folder, split):
    # PTB: ptb.train.txt; WikiText: wiki.train.tokens; plain: train.txt
    return [folder / f"ptb.{split}.txt", folder / f"wiki.{split}.tokens", folder / f"{split}.txt"]


def read_splits(data):
    """(texts by split, description). `data` is None (the default corpus), a text file (split
    90/5/5 by position, at line boundaries) or a folder with one file per split."""
    if data is None:
        text, source = default_corpus_text(), "the Python standard library's source (default)"
    else:
        path = Path(data)
        if path.is_dir():
            texts = {}
            for split in SPLITS:
                found = [p for p in _split_file_names(path, split) if p.is_file()]
                if not found:
                    names = ", ".join(p.name for p in _split_file_names(path, split))
                    raise FileNotFoundError(f"--data {path}: no {split} split (looked for {names})")
                texts[split] = found[0].read_text(encoding="utf-8", errors="replace")
            return texts, str(path)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file or folder")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path)
    lines = text.split("\n")
    first, second = int(len(lines) * 0.90), int(len(lines) * 0.95)
    texts = {"train": "\n".join(lines[:first]), "valid": "\n".join(lines[first:second]),
             "test": "\n".join(lines[second:])}
    return texts, source


def load_corpus(data=None, level="char", cleaning=True, vocabulary=None):
    """The corpus, tokenised and encoded; with `vocabulary` (a trained model's) its ids are
    used instead of a vocabulary built from this corpus's training split."""
    if level not in LEVELS:
        raise ValueError(f"--level must be one of {LEVELS}, got {level!r}")
    texts, source = read_splits(data)
    if cleaning:
        texts = {split: clean(text) for split, text in texts.items()}
    tokens = {split: tokenize(text, level) for split, text in texts.items()}
    for split in SPLITS:
        if len(tokens[split]) < 2:
            raise ValueError(f"--data {source}: the {split} split has {len(tokens[split])} "
                             f"tokens at --level {level}; a corpus needs text in every split")
    vocabulary = vocabulary or Vocabulary(tokens["train"])
    return Corpus(vocabulary, level, *(vocabulary.encode(tokens[s]) for s in SPLITS), source)


def batchify(ids, batch_size):
    """(steps, batch_size) columns of consecutive tokens, the tail that does not fill a column
    dropped: column b continues from one batch of BPTT to the next, so state can be carried."""
    steps = ids.numel() // batch_size
    if steps < 2:
        raise ValueError(f"{ids.numel()} tokens cannot fill {batch_size} columns of at least "
                         f"2 tokens; lower --batch-size")
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_windows(columns, bptt):
    """(inputs, targets) windows of at most bptt steps over batchify's columns, in order."""
    for start in range(0, columns.size(0) - 1, bptt):
        length = min(bptt, columns.size(0) - 1 - start)
        yield columns[start:start + length], columns[start + 1:start + 1 + length]
