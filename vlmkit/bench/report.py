"""Turning samples into figures (medians and the vlmkit/transformers ratio) and the printed table."""

from __future__ import annotations

from .measure import median

ROWS = [  # (metric key, label, how the value is shown)
    ("preprocess_ms_per_image", "image preprocessing (640x480), ms/image", "{:.1f}"),
    ("first_token_s", "first token, 1 image + question, s", "{:.2f}"),
    ("first_token_repeated_image_s", "first token, same image again, s", "{:.2f}"),
    ("decode_ms_per_step_batch1", "decode batch 1, ms/step", "{:.1f}"),
    ("decode_ms_per_step_batch4", "decode batch 4, ms/step", "{:.1f}"),
    ("image_token_loop_s", "text-to-image: image-token loop (CFG), s/image", "{:.1f}"),
    ("vq_decode_s", "text-to-image: VQ decode, s/image", "{:.1f}"),
    ("text_to_image_s_per_image", "text-to-image: total, s/image", "{:.1f}"),
    ("peak_rss_mb", "peak RSS, MiB", "{:.0f}"),
]


def metric(unit: str, samples: dict[str, list[float]]) -> dict:
    """Medians per engine, the vlmkit/transformers ratio (below 1: vlmkit faster or smaller) and the samples."""
    entry = {"unit": unit, **{engine: median(values) for engine, values in samples.items()}}
    entry["ratio"] = entry["vlmkit"] / entry["transformers"]
    entry["samples"] = samples
    return entry


def _extra(key: str, entry: dict) -> tuple[str, str]:
    """What goes in the notes column for each engine."""
    if key.startswith("decode_ms"):
        return tuple(f"{entry[f'{e}_tokens_per_s']:.1f} tok/s, {entry[f'{e}_pct_of_bandwidth_bound']:.0f}% of bound"
                     for e in ("vlmkit", "transformers"))
    if key == "image_token_loop_s":
        scaled = f"{entry['steps_run']} of {entry['steps_per_image']} steps, scaled; " \
            if entry["steps_run"] != entry["steps_per_image"] else ""
        return tuple(f"{scaled if e == 'vlmkit' else ''}{entry[f'{e}_pct_of_bandwidth_bound']:.0f}% of bound"
                     for e in ("vlmkit", "transformers"))
    if key == "vq_decode_s":
        full = f", whole image measured: {entry['vlmkit_full_grid_s']:.1f} s" if "vlmkit_full_grid_s" in entry else ""
        return f"{entry['grid_decoded']}{full}", ""
    if key == "first_token_repeated_image_s":
        return f"{entry['vlmkit_speedup_over_first_image']:.1f}x faster than a new image", "no feature cache"
    return "", ""


def cpu_line(cpu: dict) -> str:
    """The header line that names the CPU (``nn.cpu_features.cpu_description``), e.g. ``CPU: AMD EPYC (2 cores),
    x86_64 AVX-512 BF16 [avx2 fma avx512f ...], vlmkit kernels: avx512``: figures only compare within a class."""
    return (f"CPU: {cpu['model']} ({cpu['cores']} cores), {cpu['class']} [{' '.join(cpu['flags'])}], "
            f"vlmkit kernels: {cpu['kernels']}")


def table_lines(report: dict) -> list[str]:
    settings = report["settings"]
    lines = [cpu_line(settings["cpu"]),
             f"vlmkit {settings['vlmkit']} vs transformers {settings['transformers']} (torch {settings['torch']}), "
             f"{settings['dtype']}, {settings['threads']} threads, "
             f"memory-read bandwidth {report['memory_bandwidth_gb_s']:.1f} GB/s at the start (each bound below "
             "uses the bandwidth measured just before and after each run)"]
    rows = ROWS + [(key, f"text-to-image: {key.rsplit('_n', 1)[1]} at once, images/min (ratio: time)", "{:.2f}")
                   for family in report["families"].values() for key in family["metrics"]
                   if key.startswith("images_per_minute_n")]
    for name, family in report["families"].items():
        bound = family.get("bandwidth_bound_ms")
        lines += ["", f"{name} ({settings['size']} size): decode reads {family['decode_weight_bytes'] / 1e9:.2f} GB "
                      f"of weights per step, bandwidth bound {bound:.1f} ms/step (at the "
                      f"{family['metrics']['decode_ms_per_step_batch1']['bandwidth_gb_s']:.1f} GB/s measured around "
                      "vlmkit's decode runs, median)",
                  "| measure | vlmkit | transformers | vlmkit/transformers | notes |",
                  "|---|---:|---:|---:|---|"]
        for key, label, form in dict.fromkeys(rows):
            entry = family["metrics"].get(key)
            if entry is None:
                continue
            ours, theirs = _extra(key, entry)
            notes = "; ".join(f"{engine}: {note}" for engine, note in (("vlmkit", ours), ("transformers", theirs))
                              if note)
            lines.append(f"| {label} | {form.format(entry['vlmkit'])} | {form.format(entry['transformers'])} | "
                         f"{entry['ratio']:.2f} | {notes} |")
    return lines


def print_table(report: dict) -> None:
    print("\n".join(table_lines(report)))
