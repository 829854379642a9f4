"""CMMLU (haonan-li/cmmlu): its 67 subjects, their Chinese names and categories, and the reader of its files, as
OpenCompass 0.5.4 reads them (open-compass/opencompass @a5acc4bb, identical files).

Files: `{dir}/dev/{subject}.csv` and `{dir}/test/{subject}.csv`, UTF-8, csv.reader defaults, a header row that is
skipped by position (`,Question,A,B,C,D,Answer`), then rows of exactly 7 fields taken by position: an unnamed index
(discarded), question, A, B, C, D, answer; raw strings, nothing stripped (opencompass/datasets/cmmlu.py
`CMMLUDataset.load`). opencompass/datasets/base.py then appends `subdivision` (`cmmlu-<subject>_<split>`) and `idx`
(row number in its split); the prompt filling reads the keys in that order (llmship.data.templates).
The hub id `haonan-li/cmmlu` publishes the same CSVs in one archive, cmmlu_v1_0_1.zip (`dev/`, `test/`, 67 files
each), beside a loading script that `datasets` 4 and later no longer run: the archive is downloaded with
huggingface_hub and its CSVs are read exactly as a local folder's.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from llmship.data.sources import hub_logs_once, is_hub_id, require_exists, resolve
from llmship.errors import UserError

CMMLU_HUB_ID = "haonan-li/cmmlu"
CMMLU_HUB_ARCHIVE = "cmmlu_v1_0_1.zip"  # the release archive of haonan-li/cmmlu (its loading script downloads it)
CMMLU_LABELS = ("A", "B", "C", "D")
CMMLU_FIELDS = ("question", "A", "B", "C", "D", "answer")  # columns 1-6 of a row, by position
CMMLU_ROW_FIELDS = 7  # CMMLUDataset.load asserts len(row) == 7

# opencompass/configs/datasets/cmmlu/cmmlu_ppl_8b9c76.py `cmmlu_subject_mapping` (the Chinese name put in the prompt;
# the same dict in cmmlu_gen_c13365.py) and the primary category from opencompass/configs/summarizers/groups/cmmlu.py
# (the category of a subject's first subcategory).
CMMLU_SUBJECTS: dict[str, tuple[str, str]] = {
    'agronomy': ('农学', 'Other'),
    'anatomy': ('解剖学', 'STEM'),
    'ancient_chinese': ('古汉语', 'Social Science'),
    'arts': ('艺术学', 'Humanities'),
    'astronomy': ('天文学', 'STEM'),
    'business_ethics': ('商业伦理', 'Social Science'),
    'chinese_civil_service_exam': ('中国公务员考试', 'Social Science'),
    'chinese_driving_rule': ('中国驾驶规则', 'Other'),
    'chinese_food_culture': ('中国饮食文化', 'Social Science'),
    'chinese_foreign_policy': ('中国外交政策', 'Social Science'),
    'chinese_history': ('中国历史', 'Humanities'),
    'chinese_literature': ('中国文学', 'Humanities'),
    'chinese_teacher_qualification': ('中国教师资格', 'Social Science'),
    'clinical_knowledge': ('临床知识', 'Other'),
    'college_actuarial_science': ('大学精算学', 'STEM'),
    'college_education': ('大学教育学', 'Social Science'),
    'college_engineering_hydrology': ('大学工程水文学', 'STEM'),
    'college_law': ('大学法律', 'Humanities'),
    'college_mathematics': ('大学数学', 'STEM'),
    'college_medical_statistics': ('大学医学统计', 'STEM'),
    'college_medicine': ('大学医学', 'Other'),
    'computer_science': ('计算机科学', 'STEM'),
    'computer_security': ('计算机安全', 'Other'),
    'conceptual_physics': ('概念物理学', 'STEM'),
    'construction_project_management': ('建设工程管理', 'Other'),
    'economics': ('经济学', 'Social Science'),
    'education': ('教育学', 'Social Science'),
    'electrical_engineering': ('电气工程', 'STEM'),
    'elementary_chinese': ('小学语文', 'Social Science'),
    'elementary_commonsense': ('小学常识', 'Other'),
    'elementary_information_and_technology': ('小学信息技术', 'Other'),
    'elementary_mathematics': ('初等数学', 'STEM'),
    'ethnology': ('民族学', 'Social Science'),
    'food_science': ('食品科学', 'Other'),
    'genetics': ('遗传学', 'STEM'),
    'global_facts': ('全球事实', 'Humanities'),
    'high_school_biology': ('高中生物', 'STEM'),
    'high_school_chemistry': ('高中化学', 'STEM'),
    'high_school_geography': ('高中地理', 'Social Science'),
    'high_school_mathematics': ('高中数学', 'STEM'),
    'high_school_physics': ('高中物理学', 'STEM'),
    'high_school_politics': ('高中政治', 'Social Science'),
    'human_sexuality': ('人类性行为', 'Other'),
    'international_law': ('国际法学', 'Humanities'),
    'journalism': ('新闻学', 'Social Science'),
    'jurisprudence': ('法理学', 'Humanities'),
    'legal_and_moral_basis': ('法律与道德基础', 'Other'),
    'logical': ('逻辑学', 'Humanities'),
    'machine_learning': ('机器学习', 'STEM'),
    'management': ('管理学', 'Social Science'),
    'marketing': ('市场营销', 'Social Science'),
    'marxist_theory': ('马克思主义理论', 'Humanities'),
    'modern_chinese': ('现代汉语', 'Social Science'),
    'nutrition': ('营养学', 'Other'),
    'philosophy': ('哲学', 'Humanities'),
    'professional_accounting': ('专业会计', 'Social Science'),
    'professional_law': ('专业法学', 'Humanities'),
    'professional_medicine': ('专业医学', 'Other'),
    'professional_psychology': ('专业心理学', 'Social Science'),
    'public_relations': ('公共关系', 'Social Science'),
    'security_study': ('安全研究', 'Social Science'),
    'sociology': ('社会学', 'Social Science'),
    'sports_science': ('体育学', 'Other'),
    'traditional_chinese_medicine': ('中医中药', 'Other'),
    'virology': ('病毒学', 'STEM'),
    'world_history': ('世界历史', 'Humanities'),
    'world_religions': ('世界宗教', 'Humanities'),
}

# groups/cmmlu.py `subcategories`: the subjects that also list 'china specific' (they count in two categories).
CMMLU_CHINA_SPECIFIC: tuple[str, ...] = (
    'ancient_chinese', 'chinese_civil_service_exam', 'chinese_driving_rule', 'chinese_food_culture',
    'chinese_foreign_policy', 'chinese_history', 'chinese_literature', 'chinese_teacher_qualification',
    'construction_project_management', 'elementary_chinese', 'elementary_commonsense', 'ethnology',
    'high_school_politics', 'modern_chinese', 'traditional_chinese_medicine',
)

# opencompass/configs/summarizers/groups/cmmlu.py: each category is a naive (unweighted) average of the subjects in it;
# category -> (metric slug, OpenCompass group name), in the order of that file's `categories`.
CMMLU_GROUPS: dict[str, tuple[str, str]] = {
    "Humanities": ("humanities", "cmmlu-humanities"), "STEM": ("stem", "cmmlu-stem"),
    "Social Science": ("social-science", "cmmlu-social-science"), "Other": ("other", "cmmlu-other"),
    "China specific": ("china-specific", "cmmlu-china-specific"),
}


def categories_of(subject: str) -> tuple[str, ...]:
    """Every category a subject counts in: its primary one, then 'China specific' where it applies."""
    primary = CMMLU_SUBJECTS[subject][1]
    return (primary, "China specific") if subject in CMMLU_CHINA_SPECIFIC else (primary,)


@dataclass
class CmmluSubject:
    name: str
    name_zh: str
    dev: list[dict[str, str | int]] = field(default_factory=list)
    test: list[dict[str, str | int]] = field(default_factory=list)


def read_cmmlu(path: str | Path, subjects: list[str] | None = None) -> dict[str, CmmluSubject]:
    """Subject -> its dev and test rows, from a CMMLU folder, the hub id haonan-li/cmmlu, or '@embedded' (the bundled
    sample). `subjects`: only these (default: every subject the folder holds; on the hub, all 67)."""
    source = resolve(path, "cmmlu")
    if is_hub_id(source):
        return read_cmmlu_hub(str(source), subjects or list(CMMLU_SUBJECTS))
    require_exists(source, "a CMMLU folder with dev/<subject>.csv and test/<subject>.csv")
    if not source.is_dir():
        raise UserError("is a file; expected a CMMLU folder with dev/<subject>.csv and test/<subject>.csv", where=str(source))
    present = sorted(p.stem for p in (source / "test").glob("*.csv")) if (source / "test").is_dir() else []
    if not present:
        raise UserError("no test/<subject>.csv files; expected the CMMLU layout (dev/ and test/)", where=str(source))
    chosen = present if subjects is None else subjects
    out = {}
    for name in chosen:
        if name not in CMMLU_SUBJECTS:
            raise UserError(f"{name!r} is not one of CMMLU's 67 subjects", where=str(source / "test" / f"{name}.csv"))
        out[name] = CmmluSubject(name, CMMLU_SUBJECTS[name][0],
                                 dev=read_cmmlu_csv(source / "dev" / f"{name}.csv", name, "dev"),
                                 test=read_cmmlu_csv(source / "test" / f"{name}.csv", name, "test"))
    return out


def read_cmmlu_csv(file: Path, subject: str, split: str) -> list[dict[str, str | int]]:
    """One split's rows as OpenCompass's CMMLUDataset reads them, with base.py's subdivision and idx appended."""
    require_exists(file, f"the {split} split of subject {subject}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read as UTF-8 CSV ({err})", where=str(file)) from err
    return cmmlu_rows(text, subject, split, str(file))


def cmmlu_rows(text: str, subject: str, split: str, where: str) -> list[dict[str, str | int]]:
    """The rows of one CSV's text: the header skipped by position, then exactly 7 fields per row."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise UserError(f"cannot read as CSV ({err})", where=where) from err
    out: list[dict[str, str | int]] = []
    for number, values in enumerate(rows[1:], start=2):
        if len(values) != CMMLU_ROW_FIELDS:
            raise UserError(f"row at line {number} has {len(values)} fields; expected 7 (index,Question,A,B,C,D,Answer)",
                            where=where)
        out.append(entry(values[1:], subject, split, len(out)))
    if not out:
        raise UserError("no rows after the header; expected index,Question,A,B,C,D,Answer rows", where=where)
    return out


def entry(values: list[str], subject: str, split: str, idx: int) -> dict[str, str | int]:
    """A row as OpenCompass holds it: question, A-D, answer, then subdivision and idx (the prompt filling order)."""
    answer = values[5]
    if answer not in CMMLU_LABELS:
        raise UserError(f"row {idx} of subject {subject} ({split}) has answer {answer!r}; expected one of A, B, C, D",
                        where=f"{subject} {split}")
    return {**dict(zip(CMMLU_FIELDS, values, strict=True)), "subdivision": f"cmmlu-{subject}_{split}", "idx": idx}


def read_cmmlu_hub(name: str, subjects: list[str]) -> dict[str, CmmluSubject]:
    """The release archive of a hub dataset (haonan-li/cmmlu): its dev/ and test/ CSVs, read as a local folder's."""
    from huggingface_hub import hf_hub_download

    hub_logs_once()
    try:
        archive = hf_hub_download(name, CMMLU_HUB_ARCHIVE, repo_type="dataset")
    except Exception as err:  # noqa: BLE001 - the hub raises many types; the user needs one line
        raise UserError(f"cannot download {CMMLU_HUB_ARCHIVE} ({type(err).__name__}); point eval.cmmlu.path at a local "
                        "folder with dev/ and test/ CSVs", where=name) from err
    out = {}
    with zipfile.ZipFile(archive) as zf:
        members = {f"{PurePosixPath(n).parent.name}/{PurePosixPath(n).name}": n for n in zf.namelist() if n.endswith(".csv")}
        for subject in subjects:
            if subject not in CMMLU_SUBJECTS:
                raise UserError(f"{subject!r} is not one of CMMLU's 67 subjects", where="eval.cmmlu.subjects")
            splits = {}
            for split in ("dev", "test"):
                member = members.get(f"{split}/{subject}.csv")
                if member is None:
                    raise UserError(f"the archive has no {split}/{subject}.csv", where=f"{name}: {CMMLU_HUB_ARCHIVE}")
                splits[split] = cmmlu_rows(zf.read(member).decode("utf-8"), subject, split, f"{name}: {member}")
            out[subject] = CmmluSubject(subject, CMMLU_SUBJECTS[subject][0], dev=splits["dev"], test=splits["test"])
    return out
