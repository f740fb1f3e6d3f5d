"""Hostile inputs for the reliability campaign: audio payloads and whole HTTP requests.

Everything here is built in memory from a seed, so a failing case can be rebuilt exactly.
Two layers:

- `Payload`: bytes that arrive as "an audio file" (random bytes, truncated and lying
  WAV/FLAC headers, absurd rates and channel counts, NaN/Inf samples, non-audio formats,
  hour-long audio streamed from a constant-memory generator). `expect` says what the
  decoder and server may do with it: `"reject"` (must fail with a message) or `"any"`
  (unusual but legal audio: a valid answer or a 4xx, never a 5xx or a hang).
- `HostileRequest`: a full `/predict` or `/upload` request (httpx keyword arguments) that
  wraps a payload in one of the accepted body forms, or breaks the form itself: missing
  fields, wrong content types, malformed JSON/base64/multipart, unknown labels, unicode and
  path-like file names, oversized and many-part multipart bodies.

`catalog_*` functions enumerate a fixed, named set (used for exact counts in
experiments/reliability.md); `*_strategy` functions are hypothesis strategies over the
same builders with drawn parameters.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
from hypothesis import strategies as st

from faultsense.taxonomy import LABELS

REJECT = "reject"  # must be refused: AudioError in the library, 4xx over HTTP
ANY = "any"  # legal but unusual: a valid result or a 4xx; never a 5xx, a hang or a leak

HOUR_SECONDS = 3600
HOUR_RATE = 16_000


@dataclass(frozen=True)
class Payload:
    """One hostile "audio file": `data` in memory, or `stream()` for huge bodies."""

    kind: str
    name: str
    filename: str
    content_type: str
    data: bytes = b""
    expect: str = REJECT
    stream: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    size: int = 0  # total bytes for streamed payloads

    @property
    def nbytes(self) -> int:
        return self.size if self.stream is not None else len(self.data)

    def open(self) -> io.RawIOBase | io.BytesIO:
        """A fresh seekable file object over the payload (streamed ones never materialize)."""
        return self.stream() if self.stream is not None else io.BytesIO(self.data)


@dataclass(frozen=True)
class HostileRequest:
    """One HTTP request: `route` plus httpx.request keyword arguments built on demand."""

    kind: str
    name: str
    route: str
    build: Callable[[], dict[str, Any]] = field(compare=False, repr=False)
    expect: str = REJECT
    payload: Payload | None = None


# --------------------------------------------------------------------------- audio


def tone(
    seconds: float = 0.5, rate: int = 16_000, channels: int = 1, amp: float = 0.3
) -> np.ndarray:
    """A 440 Hz sine [T] or [T, channels] (each channel slightly detuned so it is not silent)."""
    t = np.arange(max(1, int(seconds * rate)), dtype=np.float64) / rate
    cols = [amp * np.sin(2 * np.pi * (440 + 30 * c) * t) for c in range(channels)]
    wave = np.stack(cols, axis=1).astype(np.float32)
    return wave[:, 0] if channels == 1 else wave


def encode(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode `wave` with libsndfile into an in-memory file of format `fmt`."""
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def valid_wav(seconds: float = 0.5, rate: int = 16_000, seed: int = 0) -> bytes:
    """A small clean PCM16 WAV; `seed` varies the content so uploads are not duplicates."""
    rng = np.random.default_rng(seed)
    wave = tone(seconds, rate) + 0.01 * rng.standard_normal(int(seconds * rate)).astype(np.float32)
    return encode(wave, rate, "WAV", "PCM_16")


def wav_header(
    *,
    channels: int = 1,
    rate: int = 16_000,
    bits: int = 16,
    fmt_tag: int = 1,
    data_bytes: int = 0,
    riff_bytes: int | None = None,
    block_align: int | None = None,
    byte_rate: int | None = None,
) -> bytes:
    """A canonical 44-byte RIFF/WAVE header whose every field can be made to lie."""
    block_align = channels * bits // 8 if block_align is None else block_align
    byte_rate = rate * block_align if byte_rate is None else byte_rate
    riff_bytes = 36 + data_bytes if riff_bytes is None else riff_bytes
    u32 = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", min(riff_bytes, u32))
        + b"WAVEfmt "
        + struct.pack(
            "<IHHIIHH",
            16,
            fmt_tag & 0xFFFF,
            channels & 0xFFFF,
            min(rate, u32),
            min(byte_rate, u32),
            block_align & 0xFFFF,
            bits & 0xFFFF,
        )
        + b"data"
        + struct.pack("<I", min(data_bytes, u32))
    )


def pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def lying_wav(**fields: int) -> bytes:
    """A WAV with a hand-made header (fields as in `wav_header`) over 0.25 s of real PCM16."""
    body = pcm16(tone(0.25, 16_000))
    fields.setdefault("data_bytes", len(body))
    return wav_header(**fields) + body


def flac_with_streaminfo(
    *,
    rate: int | None = None,
    channels: int | None = None,
    bits: int | None = None,
    total_samples: int | None = None,
    max_block: int | None = None,
) -> bytes:
    """A real FLAC whose STREAMINFO block is rewritten to lie about rate/channels/length."""
    data = bytearray(encode(tone(0.25, 16_000), 16_000, "FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must come first"
    info = 8  # "fLaC" + 4-byte metadata block header
    packed = int.from_bytes(data[info + 10 : info + 18], "big")
    sr, ch, bps, total = packed >> 44, (packed >> 41) & 7, (packed >> 36) & 31, packed & (2**36 - 1)
    sr = sr if rate is None else rate & (2**20 - 1)
    ch = ch if channels is None else (channels - 1) & 7
    bps = bps if bits is None else (bits - 1) & 31
    total = total if total_samples is None else total_samples & (2**36 - 1)
    packed = (sr << 44) | (ch << 41) | (bps << 36) | total
    data[info + 10 : info + 18] = packed.to_bytes(8, "big")
    if max_block is not None:
        data[info + 2 : info + 4] = (max_block & 0xFFFF).to_bytes(2, "big")
    return bytes(data)


class RepeatingAudioFile(io.RawIOBase):
    """A seekable read-only file: `header`, then `body_bytes` of `chunk` repeated.

    Represents hour-long audio in constant memory: soundfile can open it as a file object
    and an HTTP client can stream it, but the bytes never exist all at once.
    """

    def __init__(self, header: bytes, chunk: bytes, body_bytes: int) -> None:
        self._header, self._chunk, self._size = header, chunk, len(header) + body_bytes
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        done = 0
        while done < n:
            pos = self._pos + done
            if pos < len(self._header):
                src = self._header[pos : pos + n - done]
            else:
                off = (pos - len(self._header)) % len(self._chunk)
                src = self._chunk[off : off + n - done]
            view[done : done + len(src)] = src
            done += len(src)
        self._pos += n
        return n


def hour_long_wav(seconds: int = HOUR_SECONDS, rate: int = HOUR_RATE) -> Payload:
    """`seconds` of 16 kHz mono PCM16 (115 MB for an hour), generated, never held in memory."""
    chunk = pcm16(tone(1.0, rate))  # whole periods of 440 Hz per second: seamless repeats
    body = seconds * rate * 2
    header = wav_header(rate=rate, data_bytes=body)
    return Payload(
        kind="hour_long",
        name=f"wav_{seconds}s_{rate}hz_streamed",
        filename="hour.wav",
        content_type="audio/wav",
        stream=lambda: RepeatingAudioFile(header, chunk, body),
        size=len(header) + body,
    )


def iter_stream(payload: Payload, chunk_bytes: int = 1 << 16) -> Iterator[bytes]:
    """Yield a payload's bytes in chunks (an HTTP body with no Content-Length)."""
    f = payload.open()
    while block := f.read(chunk_bytes):
        yield bytes(block)


# ------------------------------------------------------------------- non-audio files


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pump.wav", valid_wav())
        z.writestr("../../escape.txt", "path traversal inside an archive")
    return buf.getvalue()


def png_bytes(width: int = 4, height: int = 4) -> bytes:
    """A valid RGB PNG, built by hand."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + b"\x80\x20\x10" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


HTML = b"<!doctype html><html><body><script>alert(1)</script>pump.wav</body></html>"


# ------------------------------------------------------------------ payload catalog


def _p(
    kind: str,
    name: str,
    data: bytes,
    *,
    filename: str | None = None,
    ct: str = "audio/wav",
    expect: str = REJECT,
) -> Payload:
    return Payload(kind, name, filename or f"{name}.wav", ct, data, expect)


def catalog_payloads() -> list[Payload]:
    """The fixed, named hostile payloads (deterministic)."""
    rng = np.random.default_rng(1234)
    good = valid_wav(0.5)
    good_flac = encode(tone(0.5), 16_000, "FLAC")
    good_ogg = encode(tone(0.5), 16_000, "OGG")
    nan_wave, inf_wave = tone(0.25), tone(0.25)
    nan_wave[100] = np.nan
    inf_wave[::50] = np.inf
    out: list[Payload] = [
        _p("empty", "empty", b""),
        _p("random_bytes", "random_16", rng.bytes(16)),
        _p("random_bytes", "random_4k", rng.bytes(4096)),
        _p("random_bytes", "riff_then_random", b"RIFF" + rng.bytes(2048)),
        _p(
            "random_bytes",
            "flac_magic_then_random",
            b"fLaC" + rng.bytes(2048),
            filename="x.flac",
            ct="audio/flac",
        ),
        _p(
            "random_bytes",
            "ogg_magic_then_random",
            b"OggS" + rng.bytes(2048),
            filename="x.ogg",
            ct="audio/ogg",
        ),
        _p("truncated", "wav_header_only_12", good[:12]),
        _p("truncated", "wav_header_only_30", good[:30]),
        _p("truncated", "wav_header_no_data", good[:44]),
        _p("truncated", "wav_odd_byte", good[:45]),
        _p(
            "truncated",
            "flac_half",
            good_flac[: len(good_flac) // 2],
            filename="half.flac",
            ct="audio/flac",
            expect=ANY,
        ),
        _p("truncated", "flac_magic_only", good_flac[:8], filename="magic.flac", ct="audio/flac"),
        _p(
            "truncated",
            "ogg_half",
            good_ogg[: len(good_ogg) // 2],
            filename="half.ogg",
            ct="audio/ogg",
            expect=ANY,
        ),
        _p("lying_header", "wav_riff_size_4gb", lying_wav(riff_bytes=0xFFFFFFFF), expect=ANY),
        _p("lying_header", "wav_data_size_4gb", lying_wav(data_bytes=0xFFFFFFFF), expect=ANY),
        _p("lying_header", "wav_zero_channels", lying_wav(channels=0, block_align=2)),
        _p("lying_header", "wav_rate_0hz", lying_wav(rate=0)),
        _p("lying_header", "wav_rate_1hz", lying_wav(rate=1)),
        _p("lying_header", "wav_rate_10mhz", lying_wav(rate=10_000_000)),
        _p("lying_header", "wav_rate_4ghz", lying_wav(rate=0xFFFFFFFF)),
        _p("lying_header", "wav_bits_0", lying_wav(bits=0, block_align=2)),
        _p("lying_header", "wav_bits_7", lying_wav(bits=7, block_align=1), expect=ANY),
        _p("lying_header", "wav_block_align_0", lying_wav(block_align=0), expect=ANY),
        _p("lying_header", "wav_65535_channels", lying_wav(channels=65535, block_align=2)),
        _p("lying_header", "wav_unknown_format_tag", lying_wav(fmt_tag=0x1234)),
        _p(
            "lying_header",
            "flac_total_2e36",
            flac_with_streaminfo(total_samples=2**36 - 1),
            filename="huge.flac",
            ct="audio/flac",
            expect=ANY,
        ),
        _p(
            "lying_header",
            "flac_rate_1hz",
            flac_with_streaminfo(rate=1),
            filename="slow.flac",
            ct="audio/flac",
        ),
        _p(
            "lying_header",
            "flac_rate_0hz",
            flac_with_streaminfo(rate=0),
            filename="zero.flac",
            ct="audio/flac",
        ),
        _p(
            "lying_header",
            "flac_8ch_declared",
            flac_with_streaminfo(channels=8),
            filename="ch8.flac",
            ct="audio/flac",
            expect=ANY,
        ),
        _p(
            "lying_header",
            "flac_max_block_0",
            flac_with_streaminfo(max_block=0),
            filename="mb0.flac",
            ct="audio/flac",
            expect=ANY,
        ),
        _p("bad_samples", "wav_float_nan", encode(nan_wave, 16_000, "WAV", "FLOAT")),
        _p("bad_samples", "wav_double_inf", encode(inf_wave, 16_000, "WAV", "DOUBLE")),
        _p(
            "bad_samples", "wav_silent", encode(np.zeros(8000, np.float32), 16_000, "WAV", "PCM_16")
        ),
        _p(
            "bad_samples",
            "wav_one_sample",
            encode(np.array([0.5], np.float32), 16_000, "WAV", "PCM_16"),
            expect=ANY,
        ),
        _p(
            "bad_samples",
            "wav_float_1e30",
            encode(tone(0.25) * 1e30, 16_000, "WAV", "FLOAT"),
            expect=ANY,
        ),
        _p("bad_samples", "wav_float_denormal", encode(tone(0.25) * 1e-40, 16_000, "WAV", "FLOAT")),
        _p(
            "unusual_valid",
            "wav_8ch_pcm24",
            encode(tone(0.5, 48_000, 8), 48_000, "WAV", "PCM_24"),
            expect=ANY,
        ),
        _p(
            "unusual_valid",
            "wav_mono_float32",
            encode(tone(0.5, 22_050), 22_050, "WAV", "FLOAT"),
            expect=ANY,
        ),
        _p(
            "unusual_valid",
            "wav_stereo_pcm32",
            encode(tone(0.5, 44_100, 2), 44_100, "WAV", "PCM_32"),
            expect=ANY,
        ),
        _p(
            "unusual_valid",
            "wav_rate_384k",
            encode(tone(0.1, 384_000), 384_000, "WAV", "PCM_16"),
            expect=ANY,
        ),
        _p(
            "unusual_valid",
            "wav_rate_1000",
            encode(tone(1.0, 1_000), 1_000, "WAV", "PCM_16"),
            expect=ANY,
        ),
        _p("not_audio", "zip_archive", zip_bytes(), filename="pump.zip", ct="application/zip"),
        _p("not_audio", "png_image", png_bytes(), filename="pump.png", ct="image/png"),
        _p("not_audio", "html_page", HTML, filename="pump.html", ct="text/html"),
        _p("not_audio", "png_named_wav", png_bytes(), filename="pump.wav"),
        _p("not_audio", "json_text", b'{"audio": "not really"}', filename="a.wav"),
        _p("not_audio", "utf16_text", "naïve text ☃".encode("utf-16"), filename="a.wav"),
    ]
    return out


def long_payloads(max_seconds: float) -> list[Payload]:
    """Audio just over the duration limit, and an hour of it streamed."""
    rate = 8_000  # small file, still over the limit in seconds
    over = encode(tone(max_seconds + 2, rate), rate, "WAV", "PCM_16")
    return [
        _p("too_long", f"wav_{max_seconds + 2:g}s", over),
        hour_long_wav(),  # 115 MB: over the byte limits
        hour_long_wav(rate=1_000),  # 7 MB: under them, refused by duration
    ]


# ------------------------------------------------------------- hypothesis: payloads


@st.composite
def truncated_wav_strategy(draw: st.DrawFn) -> Payload:
    good = valid_wav(0.25, seed=draw(st.integers(0, 3)))
    cut = draw(st.integers(0, 44))
    return _p("truncated", f"wav_cut_{cut}", good[:cut])


@st.composite
def lying_wav_strategy(draw: st.DrawFn) -> Payload:
    """A WAV header whose fields are drawn from their edges; only legal ones may be accepted."""
    channels = draw(st.sampled_from([0, 1, 2, 8, 255, 65535]))
    rate = draw(st.sampled_from([0, 1, 999, 8_000, 16_000, 384_001, 10_000_000, 0xFFFFFFFF]))
    bits = draw(st.sampled_from([0, 7, 8, 16, 24, 32, 64, 65535]))
    fmt_tag = draw(st.sampled_from([1, 3, 0, 0xFFFE, 0x1234]))
    data_bytes = draw(st.sampled_from([None, 0, 1, 0xFFFFFFFF]))
    fields = dict(channels=channels, rate=rate, bits=bits, fmt_tag=fmt_tag)
    if data_bytes is not None:
        fields["data_bytes"] = data_bytes
    return _p(
        "lying_header",
        "wav_" + "_".join(f"{k}{v}" for k, v in fields.items()),
        lying_wav(**fields),
        expect=ANY,
    )


@st.composite
def lying_flac_strategy(draw: st.DrawFn) -> Payload:
    fields = dict(
        rate=draw(st.sampled_from([None, 0, 1, 999, 1_048_575])),
        channels=draw(st.sampled_from([None, 1, 2, 8])),
        bits=draw(st.sampled_from([None, 1, 4, 24, 32])),
        total_samples=draw(st.sampled_from([None, 0, 1, 2**36 - 1])),
    )
    name = "flac_" + "_".join(f"{k}{v}" for k, v in fields.items() if v is not None)
    return _p(
        "lying_header",
        name,
        flac_with_streaminfo(**fields),
        filename="x.flac",
        ct="audio/flac",
        expect=ANY,
    )


@st.composite
def mutated_wav_strategy(draw: st.DrawFn) -> Payload:
    """A valid WAV with a few bytes overwritten (header or body): decode or reject, cleanly."""
    data = bytearray(valid_wav(0.25))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, min(len(data) - 1, 80)))
        data[pos] = draw(st.integers(0, 255))
    return _p("mutated", "wav_mutated", bytes(data), expect=ANY)


@st.composite
def float_samples_strategy(draw: st.DrawFn) -> Payload:
    """Float WAV with a drawn non-finite or extreme value sprinkled in."""
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, -1e38, 3e38]))
    every = draw(st.sampled_from([1, 7, 1000]))
    wave = tone(0.25)
    wave[::every] = value
    finite = bool(np.isfinite(value))
    subtype = draw(st.sampled_from(["FLOAT", "DOUBLE"]))
    return _p(
        "bad_samples",
        f"wav_{subtype.lower()}_{value}_every{every}",
        encode(wave, 16_000, "WAV", subtype),
        expect=ANY if finite else REJECT,
    )


def payload_strategy() -> st.SearchStrategy[Payload]:
    """Every kind of hostile audio payload, with drawn parameters."""
    return st.one_of(
        st.sampled_from(catalog_payloads()),
        st.binary(min_size=0, max_size=2048).map(
            lambda b: _p("random_bytes", f"random_{len(b)}", b)
        ),
        truncated_wav_strategy(),
        lying_wav_strategy(),
        lying_flac_strategy(),
        mutated_wav_strategy(),
        float_samples_strategy(),
    )


# ------------------------------------------------------------------ HTTP requests

PREDICT_FORMS = ("multipart", "raw", "json")

NASTY_FILENAMES = (
    "../../../../etc/passwd",
    "..\\..\\windows\\system32\\config.wav",
    "/absolute/path.wav",
    "....//....//x.wav",
    "%2e%2e%2f%2e%2e%2fx.wav",
    "ファイル名.wav",
    "\u202egnp.wav",  # right-to-left override
    "nul\x00byte.wav",
    "a" * 4096 + ".wav",
    ".",
    "..",
    "",
    "CON.wav",
    "name with spaces; rm -rf ~.wav",
    "$(touch /tmp/pwned).wav",
    "{{7*7}}${HOME}.wav",
)

BAD_LABELS = (
    "",
    " ",
    "MECHANICAL_FAULT",
    "mechanical",
    "../normal",
    "normal/../../x",
    "normal\x00",
    "normál",
    "☃",
    "fault" * 1000,
    "null",
    "[]",
    "${oc.env:HOME}",
    "hydra.run.dir=/tmp",
)


def predict_request(payload: Payload, form: str, *, filename: str | None = None) -> HostileRequest:
    """Wrap a payload in one of /predict's three body forms."""
    fname = payload.filename if filename is None else filename

    def build() -> dict[str, Any]:
        if payload.stream is not None:
            if form == "multipart":
                return {"files": {"file": (fname, payload.open(), payload.content_type)}}
            if form == "raw":
                return {
                    "content": iter_stream(payload),
                    "headers": {"Content-Type": "application/octet-stream"},
                }
            raise ValueError("a streamed payload cannot be base64 JSON")
        if form == "multipart":
            return {"files": {"file": (fname, payload.data, payload.content_type)}}
        if form == "raw":
            return {"content": payload.data, "headers": {"Content-Type": payload.content_type}}
        body = {"audio_base64": base64.b64encode(payload.data).decode(), "filename": fname}
        return {"json": body}

    return HostileRequest(
        payload.kind, f"{payload.name}/{form}", "/predict", build, payload.expect, payload
    )


def upload_request(
    payload: Payload, label: str = LABELS[0], *, filename: str | None = None
) -> HostileRequest:
    fname = payload.filename if filename is None else filename

    def build() -> dict[str, Any]:
        body = payload.open() if payload.stream is not None else payload.data
        return {"files": [("files", (fname, body, payload.content_type))], "data": {"label": label}}

    return HostileRequest(
        payload.kind, f"{payload.name}/upload", "/upload", build, payload.expect, payload
    )


def _req(kind: str, name: str, route: str, expect: str = REJECT, **kwargs: Any) -> HostileRequest:
    return HostileRequest(kind, name, route, lambda: dict(kwargs), expect)


def catalog_request_shapes(max_predict_bytes: int, max_upload_bytes: int) -> list[HostileRequest]:
    """Broken request shapes (not broken audio): fields, content types, encodings, sizes.

    Bodies over the byte limits are built only when the request is sent (`build()`)."""
    good = valid_wav(0.5, seed=7)
    b64 = base64.b64encode(good).decode()

    def big(limit: int) -> bytes:
        return valid_wav(0.5, seed=8) + b"\x00" * (limit + 1024)

    def lazy(kind: str, name: str, route: str, build: Callable[[], dict]) -> HostileRequest:
        return HostileRequest(kind, name, route, build)

    parts = [("files", (f"p{i}.wav", b"RIFF", "audio/wav")) for i in range(200)]
    reqs = [
        # /predict
        _req("missing_field", "predict_no_body", "/predict"),
        _req(
            "missing_field",
            "predict_multipart_wrong_field",
            "/predict",
            files={"audio": ("a.wav", good, "audio/wav")},
        ),
        _req("missing_field", "predict_json_empty_object", "/predict", json={}),
        _req("missing_field", "predict_json_no_audio", "/predict", json={"filename": "a.wav"}),
        _req("wrong_type", "predict_json_audio_number", "/predict", json={"audio_base64": 12345}),
        _req("wrong_type", "predict_json_audio_list", "/predict", json={"audio_base64": [b64]}),
        _req("wrong_type", "predict_json_audio_null", "/predict", json={"audio_base64": None}),
        _req("wrong_type", "predict_json_array", "/predict", json=[b64]),
        _req("wrong_type", "predict_json_string", "/predict", json=b64),
        _req(
            "bad_encoding",
            "predict_base64_invalid",
            "/predict",
            json={"audio_base64": "!!!not base64!!!"},
        ),
        _req(
            "bad_encoding", "predict_base64_truncated", "/predict", json={"audio_base64": b64[:-3]}
        ),
        _req(
            "bad_encoding",
            "predict_json_malformed",
            "/predict",
            content=b'{"audio_base64": "AAA',
            headers={"Content-Type": "application/json"},
        ),
        _req(
            "bad_encoding",
            "predict_json_not_utf8",
            "/predict",
            content=b'{"audio_base64": "\xff\xfe"}',
            headers={"Content-Type": "application/json"},
        ),
        _req(
            "bad_encoding",
            "predict_json_deep_nesting",
            "/predict",
            content=b"[" * 50_000 + b"]" * 50_000,
            headers={"Content-Type": "application/json"},
        ),
        _req(
            "wrong_content_type",
            "predict_text_plain",
            "/predict",
            content=good,
            headers={"Content-Type": "text/plain"},
        ),
        _req(
            "wrong_content_type",
            "predict_json_ct_with_audio",
            "/predict",
            content=good,
            headers={"Content-Type": "application/json"},
        ),
        _req(
            "wrong_content_type",
            "predict_multipart_no_boundary",
            "/predict",
            content=good,
            headers={"Content-Type": "multipart/form-data"},
        ),
        _req(
            "wrong_content_type",
            "predict_multipart_bad_boundary",
            "/predict",
            content=b"--x\r\nnot a part\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
        ),
        _req("wrong_content_type", "predict_form_urlencoded", "/predict", data={"file": "a.wav"}),
        lazy(
            "oversized",
            "predict_raw_over_limit",
            "/predict",
            lambda: {
                "content": big(max_predict_bytes),
                "headers": {"Content-Type": "application/octet-stream"},
            },
        ),
        lazy(  # no Content-Length: the limit must hold while streaming
            "oversized",
            "predict_raw_chunked_over_limit",
            "/predict",
            lambda: {
                "content": iter([big(max_predict_bytes)]),
                "headers": {"Content-Type": "audio/wav"},
            },
        ),
        lazy(
            "oversized",
            "predict_multipart_over_limit",
            "/predict",
            lambda: {"files": {"file": ("big.wav", big(max_predict_bytes), "audio/wav")}},
        ),
        lazy(
            "oversized",
            "predict_json_over_limit",
            "/predict",
            lambda: {"json": {"audio_base64": base64.b64encode(big(max_predict_bytes)).decode()}},
        ),
        # /upload
        _req("missing_field", "upload_no_body", "/upload"),
        _req(
            "missing_field",
            "upload_no_label",
            "/upload",
            files=[("files", ("a.wav", good, "audio/wav"))],
        ),
        _req("missing_field", "upload_no_files", "/upload", data={"label": LABELS[0]}),
        _req(
            "missing_field",
            "upload_wrong_file_field",
            "/upload",
            files=[("file_", ("a.wav", good, "audio/wav"))],
            data={"label": LABELS[0]},
        ),
        _req(
            "wrong_content_type",
            "upload_json_body",
            "/upload",
            json={"label": LABELS[0], "files": [b64]},
        ),
        _req(
            "wrong_content_type",
            "upload_raw_audio",
            "/upload",
            content=good,
            headers={"Content-Type": "audio/wav"},
        ),
        _req(
            "wrong_content_type",
            "upload_multipart_no_boundary",
            "/upload",
            content=good,
            headers={"Content-Type": "multipart/form-data"},
        ),
        lazy(
            "oversized",
            "upload_file_over_limit",
            "/upload",
            lambda: {
                "files": [("files", ("big.wav", big(max_upload_bytes), "audio/wav"))],
                "data": {"label": LABELS[0]},
            },
        ),
        _req("oversized", "upload_200_parts", "/upload", files=parts, data={"label": LABELS[0]}),
        _req(
            "oversized",
            "upload_huge_label_field",
            "/upload",
            files=[("files", ("a.wav", good, "audio/wav"))],
            data={"label": "x" * (1 << 20)},
        ),
    ]
    for label in BAD_LABELS:
        reqs.append(
            _req(
                "unknown_label",
                f"upload_label_{label[:20]!r}",
                "/upload",
                files=[("files", ("a.wav", good, "audio/wav"))],
                data={"label": label},
            )
        )
    return reqs


def catalog_injection_requests() -> list[HostileRequest]:
    """Request text aimed at Hydra, the shell and paths on the mutating routes (sent with
    the API key): each must be refused by validation, and no job may start."""
    bodies = [
        {"epochs": "1"},
        {"epochs": 0},
        {"epochs": -1},
        {"epochs": 10**9},
        {"epochs": 1.5},
        {"epochs": True},
        {"epochs": "1 hydra.run.dir=/tmp/pwned"},
        {"force": "true"},
        {"force": 1},
        {"overrides": ["model._target_=os.system"]},
        {"model": {"_target_": "subprocess.call", "args": ["touch /tmp/pwned"]}},
        {"epochs": 1, "data": {"source": "/etc"}},
        {"epochs": 1, "hydra": {"run": {"dir": "/tmp/pwned"}}},
        ["epochs=1"],
        "epochs=1",
    ]
    reqs = [
        _req("injection", f"retrain_body_{i}", "/retrain", json=b) for i, b in enumerate(bodies)
    ]
    for i, body in enumerate(
        [{"version": "../../etc"}, {"version": "v1/../v1"}, {"version": 1}, {"other": "v1"}]
    ):
        reqs.append(_req("injection", f"rollback_body_{i}", "/models/rollback", json=body))
    for name in ("..%2F..%2Fetc", "v1;touch%20%2Ftmp%2Fpwned", "v0", "v999", "V1", "%00", "v1%0a"):
        reqs.append(_req("injection", f"promote_{name}", f"/models/{name}/promote"))
    return reqs


def catalog_filename_requests(seed: int = 100) -> list[HostileRequest]:
    """Valid audio under nasty file names: stored (by sha256) or refused, never used as a path."""
    out = []
    for i, name in enumerate(NASTY_FILENAMES):
        payload = Payload(
            "filename", f"name_{i}", name, "audio/wav", valid_wav(0.5, seed=seed + i), ANY
        )
        out.append(upload_request(payload, LABELS[i % len(LABELS)], filename=name))
        out.append(predict_request(payload, "multipart", filename=name))
    return out


# ------------------------------------------------------------- hypothesis: requests

filename_strategy = st.one_of(
    st.sampled_from(NASTY_FILENAMES),
    st.text(min_size=0, max_size=64),
    st.builds(lambda a, b: f"{a}/../{b}.wav", st.text(max_size=8), st.text(max_size=8)),
)
label_strategy = st.one_of(
    st.sampled_from(BAD_LABELS), st.text(max_size=40).filter(lambda s: s.strip() not in LABELS)
)


@st.composite
def predict_request_strategy(draw: st.DrawFn) -> HostileRequest:
    payload = draw(payload_strategy())
    form = draw(st.sampled_from(PREDICT_FORMS))
    return predict_request(payload, form, filename=draw(st.one_of(st.none(), filename_strategy)))


@st.composite
def upload_request_strategy(draw: st.DrawFn) -> HostileRequest:
    """Hostile audio under a valid label, or valid audio under a hostile label/file name."""
    if draw(st.booleans()):
        return upload_request(draw(payload_strategy()), draw(st.sampled_from(LABELS)))
    seed = draw(st.integers(0, 10_000))
    payload = Payload(
        "unknown_label", "valid_audio_bad_label", "a.wav", "audio/wav", valid_wav(0.25, seed=seed)
    )
    return upload_request(payload, draw(label_strategy), filename=draw(filename_strategy))


def describe(req: HostileRequest) -> str:
    return json.dumps({"kind": req.kind, "name": req.name[:120], "route": req.route})


# ------------------------------------------------------------------ process memory


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/<pid>/task/*/children)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return seen


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (VmRSS from /proc/<pid>/status)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------ figures

RECORD_ENV = "FAULTSENSE_RELIABILITY_LOG"


def record(event: str, **fields: Any) -> None:
    """Append one JSON line to $FAULTSENSE_RELIABILITY_LOG (if set) for
    experiments/reliability_report.py; a no-op otherwise."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n")
