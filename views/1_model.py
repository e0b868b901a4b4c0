"""Model & data: which model, which calibration text, which device; the background work's progress."""

from dataclasses import replace

import streamlit as st

from views import _shared as shared

st.title("Model & data")
cfg = shared.config()

SOURCES = {
    "bundled": "Bundled SmolLM2-135M",
    "local": "Local folder or .gguf file",
    "hub": "Hugging Face hub id",
}


def _source_kind(source: str) -> str:
    if source == "smollm2-135m":
        return "bundled"
    return "local" if source.startswith(("/", ".", "~")) or source.endswith(".gguf") else "hub"


def _devices() -> list[str]:
    import torch

    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


with st.form("model_form"):
    st.subheader("Model")
    kind = st.radio(
        "Source",
        list(SOURCES),
        index=list(SOURCES).index(_source_kind(cfg.model)),
        format_func=SOURCES.get,
        horizontal=True,
        key="source_kind",
    )
    where = st.text_input(
        "Folder, .gguf file or hub id (ignored for the bundled model)",
        value="" if cfg.model == "smollm2-135m" else cfg.model,
        placeholder="/path/to/hf-folder · model.gguf · HuggingFaceTB/SmolLM2-360M",
        key="source_text",
    )
    devices = _devices()
    left, right = st.columns(2)
    device = left.selectbox(
        "Device",
        devices,
        index=devices.index(cfg.device) if cfg.device in devices else 0,
        key="device",
        help="CUDA is offered when a GPU is visible",
    )
    dtypes = ["float32", "bfloat16", "float16"]
    dtype = right.selectbox("Weights dtype", dtypes, index=dtypes.index(cfg.dtype), key="dtype")

    st.subheader("Calibration")
    text = st.text_input(
        "Calibration text",
        value=cfg.text,
        help="boolq:calibration (default), file:PATH (blank lines separate documents) or "
        "hf:NAME:CONFIG:SPLIT[:COLUMN]",
        key="text",
    )
    a, b, c = st.columns(3)
    samples = a.number_input("Samples", 1, 4096, cfg.samples, key="samples")
    seq_len = b.number_input(
        "Sequence length (0: 512 on CPU, 2048 on GPU)", 0, 32768, cfg.seq_len or 0, step=64, key="seq_len"
    )
    seed = c.number_input("Seed", 0, 2**31 - 1, cfg.seed, key="seed")
    st.subheader("Held-out tokens (for the held-out loss curves only)")
    d, e = st.columns(2)
    heldout_text = d.text_input("Held-out text", value=cfg.heldout_text, key="heldout_text")
    heldout_samples = e.number_input("Held-out samples", 1, 4096, cfg.heldout_samples, key="heldout_samples")
    submitted = st.form_submit_button("Apply", type="primary")

if submitted:
    source = "smollm2-135m" if kind == "bundled" else where.strip()
    if not source:
        st.error("Enter a folder, a .gguf file or a hub id for this source.")
        st.stop()
    cfg = replace(
        cfg,
        model=source,
        device=device,
        dtype=dtype,
        text=text.strip(),
        samples=int(samples),
        seq_len=int(seq_len) or None,
        seed=int(seed),
        heldout_text=heldout_text.strip(),
        heldout_samples=int(heldout_samples),
    )
    shared.set_config(cfg)

st.caption(
    f"Current: **{cfg.model}** on {cfg.device} ({cfg.dtype}); calibration {cfg.samples} × "
    f"{cfg.seq_len or 'auto'} tokens of `{cfg.text}` (seed {cfg.seed}); held-out {cfg.heldout_samples} "
    f"samples of `{cfg.heldout_text}`."
)

if submitted:
    try:
        shared.service_config(cfg).check()  # cheap checks before any work
    except ValueError as err:
        shared.show_error(err, f"Cannot use {cfg.model}")
        st.stop()

# The service starts on first use and computes in the background: this page and every other one
# show its progress, and nothing here waits for it.
shared.status_panel(lambda s: (s.bank is not None, s.stats_ready, s.state), expanded=True)
snap = shared.service(cfg).snapshot()
if snap.loaded is not None:
    bank = snap.bank
    st.success(
        f"Loaded {snap.loaded.family} model `{snap.loaded.source}` (fingerprint {snap.loaded.fingerprint}): "
        f"{bank.total_params:,} parameters, {len(set(bank.layers.tolist()))} layers, {len(bank.names)} target "
        "matrices."
        + (
            " Calibration and held-out statistics are ready."
            if snap.stats_ready
            else " The statistics are being collected: the Spectra page already shows what is ready."
        )
    )
