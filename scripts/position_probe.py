"""Why the embedded default's teacher misses position questions: train a model on them alone, asked
one way or another, and follow its held-out accuracy; and probe what its visual tokens carry.

    python scripts/position_probe.py runs/tiny/teacher --data runs/data/shapes --phrasing check
    python scripts/position_probe.py runs/tiny/teacher --data runs/data/shapes --phrasing verify
    python scripts/position_probe.py runs/tiny/teacher --data runs/data/shapes --phrasing text
    python scripts/position_probe.py runs/tiny/teacher --data runs/data/shapes --phrasing verify --with search
    python scripts/position_probe.py runs/tiny/teacher --data runs/data/shapes --visual
    python scripts/position_probe.py runs/tiny/teacher --data runs/data/shapes --lookup

Each phrasing fine-tunes the model (projector and LLM, the tower frozen, as the teacher's SFT does)
on nothing but one kind of yes/no question about ShapesVQA's training scenes, and prints its exact
match on the same kind of question about the held-out scenes every `--every` steps:

- `check`: the position questions as generated ("is the red shape in the top left ?", "is the
  circle in the top left ?"), the named cell empty in part of the "no" answers;
- `verify`: the named cell's shape checked against a colour, "is the shape in the top left red ?",
  asked of occupied cells only, yes and no equally often (the reading the model does at 100% when it
  names the colour, followed by a comparison);
- `search`: a colour looked for anywhere, "is there a red shape ?", yes and no equally often;
- `text`: the `check` questions with the scene's caption in place of the image (the LLM alone);
- `compare`: two colours in words, "is the red shape blue ?" (a comparison with no lookup).

`--with P` trains on as many questions of phrasing P besides (a curriculum: `verify --with search`)
and still scores the first phrasing only.

`--visual` instead fits linear probes on the visual tokens (the tower's last hidden state and the
projector's output) of training scenes: the cell of a token on a shape, and the colour under a token.
`--lookup` fits one per layer on the answer position of colour questions ("what color is the shape
in the top left ?"): after which block the colour of the named cell can be read.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.data.questions import load_eval_items
from lsd_edge.data.shapes import COLORS, POSITIONS, Scene, Shape, caption
from lsd_edge.evaluate.accuracy import evaluate_answers
from lsd_edge.evaluate.greedy import TrainingModel
from lsd_edge.models.load import load_llava

PHRASINGS = ("check", "verify", "search", "text", "compare")


def scene_of(record: dict) -> Scene:
    return Scene(tuple(Shape(**s) for s in record["scene"]["shapes"]))


def turn(record_id: str, image: str | None, question: str, answer: str) -> dict:
    prompt = question if image is None else f"<image>\n{question}"
    out = {"id": record_id, "type": "position", "conversations": [{"from": "human", "value": prompt}]}
    out["conversations"].append({"from": "gpt", "value": answer})
    return out if image is None else out | {"image": image}


def rephrase(phrasing: str, records: list[dict], scenes: dict[str, Scene], rng: random.Random) -> list[dict]:
    """Yes/no questions of `phrasing` about the scenes of `records` (LLaVA records with an image)."""
    out = []
    for r in records:
        scene = scenes[r["image"]]
        if phrasing == "verify":
            shape = rng.choice(scene.shapes)
            answer = rng.choice(("yes", "no"))
            color = shape.color if answer == "yes" else rng.choice([c for c in COLORS if c != shape.color])
            out.append(turn(r["id"], r["image"], f"is the shape in the {shape.position} {color} ?", answer))
        elif phrasing == "search":
            answer = rng.choice(("yes", "no"))
            present = {s.color for s in scene.shapes}
            pool = sorted(present) if answer == "yes" else [c for c in COLORS if c not in present]
            out.append(turn(r["id"], r["image"], f"is there a {rng.choice(pool)} shape ?", answer))
        elif phrasing == "compare":
            a = rng.choice(list(COLORS))
            b = a if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != a])
            out.append(turn(r["id"], None, f"is the {a} shape {b} ?", "yes" if a == b else "no"))
        elif r.get("type") == "position":
            question = r["conversations"][0]["value"].split("\n", 1)[1]
            answer = r["conversations"][1]["value"]
            if phrasing == "check":
                out.append(turn(r["id"], r["image"], question, answer))
            else:  # text: the caption says what the image shows
                out.append(turn(r["id"], None, f"{caption(scene)}\n{question}", answer))
    return out


def read(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def from_rows(rows: list[dict], open_rows):
    """`open_rows(path)` of LLaVA records written to a temporary JSON file (read whole when opened)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return open_rows(path)


def probe_questions(model_dir: str, data: Path, phrasing: str, args) -> None:
    torch.manual_seed(args.seed)
    model, processor = load_llava(model_dir)
    pretrain, evaluation = read(data / "pretrain.json"), read(data / "eval.json")
    scenes = {r["image"]: scene_of(r) for r in pretrain + evaluation}
    rng = random.Random(args.seed)
    instruct = read(data / "instruct.json")
    train = rephrase(phrasing, instruct, scenes, rng)
    if args.with_ is not None:  # as many questions of the other phrasing, shuffled in
        train += rephrase(args.with_, instruct, scenes, rng)[: len(train)]
        rng.shuffle(train)
    held_out = rephrase(phrasing, evaluation, scenes, rng)[: args.eval_samples]
    if not train or not held_out:
        sys.exit(f"{data}: no position questions to train or score on; generate ShapesVQA with more scenes")
    dataset = from_rows(
        train, lambda p: LlavaDataset(p, data / "images", processor, max_length=args.max_length)
    )
    items = from_rows(held_out, lambda p: load_eval_items(p, data / "images", processor))
    loader = BatchLoader(dataset, processor.tokenizer.pad_token_id or 0)
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))

    def accuracy() -> float:
        model.eval()
        result = evaluate_answers(TrainingModel(model, processor), items, 4, batch_size=100)
        model.train()
        return result.accuracy

    question, answer = (t["value"] for t in held_out[0]["conversations"])
    print(
        f"{phrasing}: {len(dataset)} training and {len(items)} held-out questions, e.g. {question!r} -> {answer}"
    )
    curve = [{"step": 0, "accuracy": accuracy()}]
    print(f"step 0: held-out exact match {curve[0]['accuracy']:.3f}")
    model.train()
    order = list(range(len(dataset)))
    for step in range(1, args.steps + 1):
        batch = loader.batch(rng.sample(order, min(args.batch_size, len(order))))
        loss = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            labels=batch.labels,
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, "loss": loss.item(), "accuracy": accuracy()})
            print(f"step {step}: loss {loss.item():.3f}, held-out exact match {curve[-1]['accuracy']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"phrasing": phrasing, "curve": curve}, indent=1) + "\n")


def cells_of_tokens(grid: int) -> torch.Tensor:
    """The quadrant (index into POSITIONS) of each of a grid x grid tower's patches, in reading order."""
    return torch.tensor([(t // grid >= grid / 2) * 2 + (t % grid >= grid / 2) for t in range(grid * grid)])


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy (the last fifth) of a linear classifier of y from x, fitted on the rest."""
    n = int(len(x) * 0.8)
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x[:n]), y[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (head(x[n:]).argmax(-1) == y[n:]).float().mean().item()


def probe_visual(model_dir: str, data: Path, scenes_n: int) -> None:
    from PIL import Image

    model, processor = load_llava(model_dir)
    records = read(data / "pretrain.json")[:scenes_n]
    images = [Image.open(data / "images" / r["image"]).convert("RGB") for r in records]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tower = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        projected = model.model.multi_modal_projector(tower)
    grid = int(tower.shape[1] ** 0.5)
    cells = cells_of_tokens(grid).expand(len(records), -1)
    colors = torch.full(cells.shape, len(COLORS))  # the last class: nothing under the token
    for i, r in enumerate(records):
        for s in scene_of(r).shapes:
            colors[i][cells[i] == s.cell] = list(COLORS).index(s.color)
    on_shape = colors < len(COLORS)
    print(f"{len(records)} scenes, {grid} x {grid} visual tokens; held-out accuracy of linear probes:")
    for name, x in (("tower", tower), ("projector", projected)):
        cell = linear_probe(x[on_shape], cells[on_shape], len(POSITIONS))
        color = linear_probe(x.reshape(-1, x.shape[-1]), colors.reshape(-1), len(COLORS) + 1)
        print(f"{name}: cell of a token on a shape {cell:.3f} (chance 0.25), colour or nothing {color:.3f}")


def probe_lookup(model_dir: str, data: Path, n: int) -> None:
    """Per layer, how well a linear probe reads the asked colour from the answer position's hidden
    state on colour questions: where in the model the lookup of a named cell is done."""
    model, processor = load_llava(model_dir)
    rows = [r for r in read(data / "instruct.json") if r["type"] == "color"][:n]
    dataset = from_rows(rows, lambda p: LlavaDataset(p, data / "images", processor, max_length=160))
    loader = BatchLoader(dataset, processor.tokenizer.pad_token_id or 0)
    states, targets = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 250):
            batch = loader.batch(list(range(start, min(start + 250, len(dataset)))))
            hidden = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                output_hidden_states=True,
            ).hidden_states
            at = (batch.labels != -100).float().argmax(1) - 1  # the position that predicts the answer
            rows_ = torch.arange(len(at))
            states.append(torch.stack(hidden, 1)[rows_, :, at])
            targets.append(batch.labels[rows_, at + 1])
    x, answer = torch.cat(states), torch.cat(targets)
    y = torch.searchsorted(answer.unique(), answer)
    layers = [f"{linear_probe(x[:, i], y, int(y.max()) + 1):.3f}" for i in range(x.shape[1])]
    print(f"{len(y)} colour questions; the asked colour read linearly at the answer position after")
    print("the embeddings and each block: " + ", ".join(layers))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a trained LLaVA folder, e.g. runs/tiny/teacher")
    p.add_argument("--data", default="runs/data/shapes", help="the ShapesVQA folder it was trained on")
    p.add_argument("--phrasing", choices=PHRASINGS, default="check")
    p.add_argument(
        "--with", dest="with_", choices=PHRASINGS, help="train on as many questions of this phrasing too"
    )
    p.add_argument("--visual", action="store_true", help="probe the visual tokens instead of training")
    p.add_argument("--lookup", action="store_true", help="probe where the colour of a named cell is read")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--scenes", type=int, default=3000, help="scenes for --visual, questions for --lookup")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the held-out curve here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "shapes.json").is_file():
        sys.exit(f"{data}: not a ShapesVQA folder (no shapes.json); give the recipe's data.root")
    layout = json.loads((data / "shapes.json").read_text()).get("layout", "quadrants")
    if layout != "quadrants":
        sys.exit(f"{data}: the {layout} layout; this probe reads the quadrants layout's scenes")
    if args.visual:
        probe_visual(args.model, data, args.scenes)
    elif args.lookup:
        probe_lookup(args.model, data, args.scenes)
    else:
        probe_questions(args.model, data, args.phrasing, args)


if __name__ == "__main__":
    main()
