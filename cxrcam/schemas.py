"""The class list of each dataset, defined once: names, ids and drawing colours.

Every other module asks this one for class names and ids, so a dataset's classes
live in exactly one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Tableau-20-like palette (RGB); class i of any schema draws in PALETTE[i % 20]. Its olive and pale
# yellow are replaced (magenta, dark green): truth boxes are yellow.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (255, 0, 255), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (0, 110, 0), (158, 218, 229),
)


@dataclass(frozen=True)
class Schema:
    """Finding classes of one dataset. Findings have ids 0..n-1; the "normal" class,
    when the dataset has one, takes id n (VinBigData's 14 "No finding")."""

    name: str  # also the dataset's name on the command line (``--dataset``)
    findings: tuple[str, ...]
    no_finding: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    label_tables: tuple[str, ...] = ()  # globs of the label tables that mark a folder of this dataset as released

    @property
    def num_findings(self) -> int:
        return len(self.findings)

    @property
    def no_finding_id(self) -> int | None:
        return None if self.no_finding is None else len(self.findings)

    def class_id(self, name: str) -> int:
        """Id of a class name as written in the dataset's files (aliases included)."""
        name = self.aliases.get(name, name)
        if name in self.findings:
            return self.findings.index(name)
        if name == self.no_finding:
            return len(self.findings)
        raise KeyError(f"unknown {self.name} class {name!r}")

    def class_name(self, class_id: int) -> str:
        if class_id == self.no_finding_id:
            return self.no_finding  # type: ignore[return-value]
        return self.findings[class_id]

    def colour(self, class_id: int) -> tuple[int, int, int]:
        """RGB drawing colour of a class."""
        return PALETTE[class_id % len(PALETTE)]


VINBIG = Schema(
    "vinbig",
    ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation",
     "ILD", "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
     "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis"),
    no_finding="No finding",
    label_tables=("train.csv", "test.csv"),  # test.csv + test/: a labelled held-out split
)

NIH = Schema(
    "nih",
    ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
     "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
     "Hernia"),
    no_finding="No Finding",
    aliases={"Infiltrate": "Infiltration"},  # BBox_List_2017.csv spells it this way
    label_tables=("Data_Entry_2017*.csv",),
)

RSNA = Schema("rsna", ("Lung Opacity",), label_tables=("stage_2_train_labels.csv",))

# the datasets cxrcam reads, by name: the command line's choices, the readers and the folder markers
SCHEMAS: dict[str, Schema] = {s.name: s for s in (VINBIG, NIH, RSNA)}
PLAIN = "images"  # a plain folder of images: no dataset, no labels


def get_schema(name: str) -> Schema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose one of {', '.join(SCHEMAS)}") from None
