"""The conditioning study runs end to end and reports every variant and the dx contrast."""

import math
import re

from medflow.conditioning_study import VARIANTS, main


def test_study_writes_every_variant_and_the_dx_contrast(tmp_path):
    out = tmp_path / "CONDITIONING.md"
    main(["--preset", "tiny", "--steps", "2", "--seeds", "0", "--subjects", "10", "--heldout", "2",
          "--data-spacing", "4", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    for variant in VARIANTS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
        assert math.isfinite(float(row.split("|")[3]))
    for changed in ("every covariate at its default |", "each FLAIR without its lesions |",
                    "each ASL without the metabolic information |"):
        paired = next(line for line in text.splitlines() if changed in line)
        assert math.isfinite(float(paired.split("|")[3])) and math.isfinite(float(paired.split("|")[4]))
    fraction = float(re.search(r"by 3 % or more in (\S+) % of the held-out", text).group(1))
    assert 0.0 < fraction < 100.0
    contrast = [line for line in text.splitlines() if re.match(r"\| sub-\d{3} \|", line)]
    assert len(contrast) == 2 and all(math.isfinite(float(c.split("|")[3])) for c in contrast)
    assert "failed" not in text
    core, rest, regional = map(float, re.search(
        r"Mean over subjects: (\S+) % in the core against (\S+) % .* regional effect of (\S+) points", text, re.S).groups())
    assert abs(regional - (core - rest)) <= 0.11  # each printed to 0.1
