"""What scBERT 2.0's MoE dispatch costs: `python benchmarks/moe_dispatch.py [--repeats 30]`.

Times one `scbert2-moe` MoE block (8 experts, top-2) on the hidden states real Baron cells give its first layer,
at batch 1 (one cell) and batch 32 (padded), in two ways on the same weights and inputs, alternating so both see
the same machine load:
- the project's dispatch (`ScBert2SparseMoeBlock.forward`): (token, choice) pairs sorted by expert once, each
  expert's tokens then one contiguous slice of that order;
- Mixtral's reference dispatch (transformers' `MixtralSparseMoeBlock` of 2024): a one-hot expert mask, then per
  expert a `torch.where` over all tokens, an `index_select` and an `index_add_`.
Both outputs are checked equal. Writes benchmarks/results/moe_dispatch/moe_dispatch.json and .md (its own folder:
run.py clears the JSON files of benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # as in run.py: import the benchmarks package, not its modules by file name

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.data import Cells, scbert2_inputs  # noqa: E402
from benchmarks.measure import median, other_cpu_share, timed, wait_for_idle  # noqa: E402
from benchmarks.models import scbert2  # noqa: E402


def mixtral_reference_dispatch(block, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The per-expert mask-and-where loop of transformers' Mixtral block, on `block`'s router and experts."""
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden_dim)  # [B, L, H] -> [B*L, H]
    _, top_k_weights, top_k_index = block.route(flat)
    expert_mask = F.one_hot(top_k_index, num_classes=block.num_experts).permute(2, 1, 0)  # [N, k, E] -> [E, k, N]
    if token_mask is not None:
        expert_mask = expert_mask * token_mask.reshape(1, 1, -1).to(expert_mask.dtype)  # [B, L] -> [1, 1, B*L]
    output = torch.zeros_like(flat)
    for expert_idx in torch.nonzero(expert_mask.sum(dim=(1, 2))).flatten().tolist():
        choice, token_idx = torch.where(expert_mask[expert_idx])
        expert_output = block.experts[expert_idx](flat.index_select(0, token_idx))
        output.index_add_(0, token_idx, expert_output * top_k_weights[token_idx, choice, None].to(flat.dtype))
    return output.reshape(batch_size, seq_len, hidden_dim)  # [B*L, H] -> [B, L, H]


def first_moe_input(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states and token mask the first layer's MoE block receives for `inputs`."""
    captured = {}
    block = model.model.layers[0].mlp

    def capture(module, args, kwargs) -> None:
        captured["inputs"] = (args[0], kwargs.get("token_mask"))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.inference_mode():
        model(**inputs)
    handle.remove()
    return captured["inputs"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default=str(REPO / "benchmarks" / "results" / "moe_dispatch"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cells = Cells.load()
    model = scbert2(cells, "scbert2-moe", "sdpa").eval()
    block = model.model.layers[0].mlp
    rows = []
    for batch_size in (1, 32):
        hidden_states, token_mask = first_moe_input(model, scbert2_inputs(cells, cells.sample_rows(batch_size)))
        ours = lambda: block(hidden_states, token_mask)  # noqa: E731
        reference = lambda: mixtral_reference_dispatch(block, hidden_states, token_mask)  # noqa: E731
        with torch.inference_mode():
            torch.testing.assert_close(ours()[0], reference(), atol=1e-5, rtol=1e-5)
            for _ in range(3):
                ours(), reference()
            wait_for_idle(0.05, timeout_s=120)
            times = {"sorted": [], "mixtral_loop": []}
            with other_cpu_share() as load:
                for _ in range(args.repeats):
                    times["sorted"].append(timed(ours, lambda: None))
                    times["mixtral_loop"].append(timed(reference, lambda: None))
        tokens = int(token_mask.sum()) if token_mask is not None else hidden_states.shape[0] * hidden_states.shape[1]
        rows.append({"batch_size": batch_size, "tokens": tokens, "padded_tokens": hidden_states.shape[0] * hidden_states.shape[1],
                     "sorted_ms": 1e3 * median(times["sorted"]), "mixtral_loop_ms": 1e3 * median(times["mixtral_loop"]),
                     "repeats": args.repeats, "other_cpu_share": load["other_cpu_share"]})
        rows[-1]["speedup"] = rows[-1]["mixtral_loop_ms"] / rows[-1]["sorted_ms"]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    result = {"block": "scbert2-moe layer 0 (8 experts, top-2)", "threads": args.threads, "rows": rows}
    (output / "moe_dispatch.json").write_text(json.dumps(result, indent=2))
    table = ["| batch | real tokens | Mixtral loop (ms, median) | sorted dispatch (ms, median) | speed-up | others' CPU |",
             "|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['batch_size']} | {r['tokens']:,} | {r['mixtral_loop_ms']:.2f} | {r['sorted_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['other_cpu_share']:.1%} |" for r in rows]
    (output / "moe_dispatch.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main()
