#!/usr/bin/env python3
"""Synthesise test speech with a known transcript, as a phone call would carry it.

For each (voice, text) clip: espeak-ng speaks the text to a WAV (22.05 kHz), sentence by sentence
with a pause between sentences (SSML breaks, ``--pause-ms``) as a caller would make, so the
transcriber has utterances to cut; sox turns it into
raw G.711 μ-law at 8 kHz (exactly what Twilio sends in `media.payload`, level normalised to
-3 dBFS peak), and from that μ-law — never from the wideband WAV — derives:

* ``NAME.s16le-8k.raw``  : 8 kHz s16le, what the gateway publishes on the default topics;
* ``NAME.s16le-16k.raw`` : the same upsampled to 16 kHz by sox, a stand-in for the gateway's
                           ``wb16`` output profile (same information, model-friendly rate);
* ``NAME.txt``           : the reference transcript.

A ``manifest.json`` lists the clips. Nothing here is committed: the selftest makes it afresh.

    make_speech.py --out DIR [--voices en-us+klatt,en-us+klatt2] [--speed 150] [--text "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

# Clear, common words; numbers are written out (the WER normaliser does not spell digits).
TEXTS = [
    "Please call me back tomorrow morning about the order. I would like to change the "
    "delivery address to my new home. The package should arrive before Friday. Thank you "
    "very much for your help.",
    "Hello, I am calling about my account. I paid the bill last week but the money is still "
    "not there. Can you check it for me and send me an email today?",
    "The weather was cold and windy this morning. We stayed inside and read a good book. In "
    "the afternoon the sun came out and we walked to the park with the children.",
]

# espeak-ng's American English voice and five of its Klatt-synthesiser variants. Synthetic speech
# is far from the telephone speech the bundled model was trained on, and some espeak voices are
# recognised much worse than others (e.g. en-us+m1, en-us+f2); these six give absolute WERs that
# are high but low enough to compare configurations. See README.md.
VOICES = ["en-us", "en-us+klatt", "en-us+klatt2", "en-us+klatt3", "en-us+klatt4", "en-us+klatt5"]


def run(cmd: list[str]):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


def ssml(text: str, pause_ms: int) -> str:
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if s.strip()]
    esc = [s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for s in sentences]
    return "<speak>" + f'<break time="{pause_ms}ms"/>'.join(esc) + "</speak>"


def make_clip(out: str, name: str, voice: str, text: str, speed: int, pause_ms: int) -> dict:
    wav = os.path.join(out, f"{name}.wav")
    ulaw = os.path.join(out, f"{name}.ulaw")
    s8 = os.path.join(out, f"{name}.s16le-8k.raw")
    s16 = os.path.join(out, f"{name}.s16le-16k.raw")
    run(["espeak-ng", "-m", "-v", voice, "-s", str(speed), "-w", wav, ssml(text, pause_ms)])
    # sox -R: repeatable dither. sox dithers whenever it reduces precision (here to 8-bit
    # μ-law, which leaves a faint noise floor like a real line's instead of espeak's digital
    # silence), by default with a random seed: every run would differ, and so would the WER.
    raw_mulaw = ["-t", "raw", "-r", "8000", "-c", "1", "-e", "mu-law", "-b", "8"]
    s16le = ["-t", "raw", "-e", "signed", "-b", "16", "-L"]
    run(["sox", "-R", wav, *raw_mulaw, ulaw, "gain", "-n", "-3"])
    run(["sox", "-R", *raw_mulaw, ulaw, *s16le, "-r", "8000", s8])
    run(["sox", "-R", *raw_mulaw, ulaw, *s16le, "-r", "16000", s16])
    with open(os.path.join(out, f"{name}.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return {
        "name": name,
        "voice": voice,
        "speed_wpm": speed,
        "pause_ms": pause_ms,
        "text": text,
        "seconds": os.path.getsize(ulaw) / 8000,
        "mulaw_8k": ulaw,
        "s16le_8k": s8,
        "s16le_16k": s16,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--voices", default=",".join(VOICES), help="comma-separated espeak-ng voices")
    p.add_argument("--speed", type=int, default=150, help="words per minute")
    p.add_argument("--pause-ms", type=int, default=800, help="pause between sentences")
    p.add_argument(
        "--text",
        action="append",
        help="text to speak (repeatable; default: three built-in texts, one per clip in turn)",
    )
    args = p.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run setup.sh")
    texts = args.text or TEXTS
    os.makedirs(args.out, exist_ok=True)
    clips = []
    for i, voice in enumerate(v for v in args.voices.split(",") if v):
        name = f"clip{i}-{voice.replace('+', '_')}"
        clips.append(
            make_clip(args.out, name, voice, texts[i % len(texts)], args.speed, args.pause_ms)
        )
        print(
            f"{name}: {clips[-1]['seconds']:.1f}s, {len(texts[i % len(texts)].split())} words",
            file=sys.stderr,
        )
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(clips, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
