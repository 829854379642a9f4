#!/usr/bin/env python3
"""Regenerate llmship's embedded default: the sample data (C4 / C-Eval / alpaca / ShareGPT formats) and the tiny
Chinese+English LLaMA trained on the project's own corpora.

Everything is generated from the fact tables below (written for this project; no external text), deterministically:
    python scripts/make_embedded_model.py --samples-only      # sample data only (seconds)
    python scripts/make_embedded_model.py                     # samples + tokenizer + training (minutes on 2 cores)

The C-Eval-format questions are multiple choice over the facts. Training text states the facts (C4-style prose,
alpaca-style instructions) and includes C-Eval-style questions with freshly drawn options; the shipped val questions
are new questions (their option set/order never appears in the training text), so the val accuracy measures what the
model learned about the facts and the format, not memorised rows.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmship.data import templates  # noqa: E402

ASSETS = ROOT / "llmship" / "assets"
SAMPLES = ASSETS / "samples"
MODEL_DIR = ASSETS / "tiny-llama-zh"
SEED = 1234

# --------------------------------------------------------------------------- fact tables (written for this project)
PROVINCES = [  # province, capital, English province, English capital
    ("广东", "广州", "Guangdong", "Guangzhou"), ("浙江", "杭州", "Zhejiang", "Hangzhou"), ("江苏", "南京", "Jiangsu", "Nanjing"),
    ("四川", "成都", "Sichuan", "Chengdu"), ("湖北", "武汉", "Hubei", "Wuhan"), ("湖南", "长沙", "Hunan", "Changsha"),
    ("山东", "济南", "Shandong", "Jinan"), ("河南", "郑州", "Henan", "Zhengzhou"), ("河北", "石家庄", "Hebei", "Shijiazhuang"),
    ("陕西", "西安", "Shaanxi", "Xi'an"), ("山西", "太原", "Shanxi", "Taiyuan"), ("福建", "福州", "Fujian", "Fuzhou"),
    ("安徽", "合肥", "Anhui", "Hefei"), ("江西", "南昌", "Jiangxi", "Nanchang"), ("云南", "昆明", "Yunnan", "Kunming"),
    ("贵州", "贵阳", "Guizhou", "Guiyang"), ("辽宁", "沈阳", "Liaoning", "Shenyang"), ("吉林", "长春", "Jilin", "Changchun"),
    ("黑龙江", "哈尔滨", "Heilongjiang", "Harbin"), ("甘肃", "兰州", "Gansu", "Lanzhou"), ("青海", "西宁", "Qinghai", "Xining"),
    ("海南", "海口", "Hainan", "Haikou"),
]
COUNTRIES = [  # country, capital, English country, English capital
    ("法国", "巴黎", "France", "Paris"), ("德国", "柏林", "Germany", "Berlin"), ("日本", "东京", "Japan", "Tokyo"),
    ("英国", "伦敦", "the United Kingdom", "London"), ("意大利", "罗马", "Italy", "Rome"), ("俄罗斯", "莫斯科", "Russia", "Moscow"),
    ("美国", "华盛顿", "the United States", "Washington"), ("加拿大", "渥太华", "Canada", "Ottawa"),
    ("澳大利亚", "堪培拉", "Australia", "Canberra"), ("埃及", "开罗", "Egypt", "Cairo"), ("印度", "新德里", "India", "New Delhi"),
    ("韩国", "首尔", "South Korea", "Seoul"), ("西班牙", "马德里", "Spain", "Madrid"), ("泰国", "曼谷", "Thailand", "Bangkok"),
    ("巴西", "巴西利亚", "Brazil", "Brasilia"), ("希腊", "雅典", "Greece", "Athens"), ("土耳其", "安卡拉", "Turkey", "Ankara"),
    ("越南", "河内", "Vietnam", "Hanoi"), ("墨西哥", "墨西哥城", "Mexico", "Mexico City"), ("葡萄牙", "里斯本", "Portugal", "Lisbon"),
]
ELEMENTS = [  # Chinese name, symbol, atomic number, English name
    ("氢", "H", 1, "hydrogen"), ("氦", "He", 2, "helium"), ("锂", "Li", 3, "lithium"), ("铍", "Be", 4, "beryllium"),
    ("硼", "B", 5, "boron"), ("碳", "C", 6, "carbon"), ("氮", "N", 7, "nitrogen"), ("氧", "O", 8, "oxygen"),
    ("氟", "F", 9, "fluorine"), ("氖", "Ne", 10, "neon"), ("钠", "Na", 11, "sodium"), ("镁", "Mg", 12, "magnesium"),
    ("铝", "Al", 13, "aluminium"), ("硅", "Si", 14, "silicon"), ("磷", "P", 15, "phosphorus"), ("硫", "S", 16, "sulfur"),
    ("氯", "Cl", 17, "chlorine"), ("氩", "Ar", 18, "argon"), ("钾", "K", 19, "potassium"), ("钙", "Ca", 20, "calcium"),
    ("铁", "Fe", 26, "iron"), ("铜", "Cu", 29, "copper"), ("锌", "Zn", 30, "zinc"), ("银", "Ag", 47, "silver"),
    ("金", "Au", 79, "gold"),
]
ANTONYMS = [
    ("大", "小"), ("高", "低"), ("长", "短"), ("多", "少"), ("快", "慢"), ("冷", "热"), ("黑", "白"), ("上", "下"),
    ("左", "右"), ("前", "后"), ("买", "卖"), ("远", "近"), ("新", "旧"), ("轻", "重"), ("胖", "瘦"), ("早", "晚"),
    ("难", "易"), ("好", "坏"), ("强", "弱"), ("深", "浅"), ("宽", "窄"), ("真", "假"), ("哭", "笑"), ("安全", "危险"),
    ("成功", "失败"), ("勤劳", "懒惰"), ("美丽", "丑陋"), ("简单", "复杂"), ("干净", "肮脏"), ("光明", "黑暗"),
    ("快乐", "悲伤"), ("聪明", "愚蠢"), ("热闹", "冷清"), ("开始", "结束"), ("进步", "落后"),
]
ANTONYMS_EN = [("big", "small"), ("high", "low"), ("long", "short"), ("fast", "slow"), ("cold", "hot"), ("black", "white"),
               ("new", "old"), ("light", "heavy"), ("early", "late"), ("good", "bad"), ("strong", "weak"), ("deep", "shallow"),
               ("wide", "narrow"), ("true", "false"), ("safe", "dangerous"), ("simple", "complex"), ("clean", "dirty"),
               ("happy", "sad"), ("begin", "end"), ("near", "far")]
DYNASTIES = [  # dynasty, founder, capital
    ("秦朝", "嬴政", "咸阳"), ("西汉", "刘邦", "长安"), ("东汉", "刘秀", "洛阳"), ("西晋", "司马炎", "洛阳"), ("隋朝", "杨坚", "大兴"),
    ("唐朝", "李渊", "长安"), ("北宋", "赵匡胤", "开封"), ("元朝", "忽必烈", "大都"), ("明朝", "朱元璋", "南京"), ("新朝", "王莽", "长安"),
]
EVENTS = [  # event, year
    ("鸦片战争爆发", "1840年"), ("辛亥革命爆发", "1911年"), ("五四运动爆发", "1919年"), ("中华人民共和国成立", "1949年"),
    ("秦朝统一六国", "公元前221年"), ("郑和第一次下西洋", "1405年"), ("甲午战争爆发", "1894年"), ("戊戌变法开始", "1898年"),
]
UNITS = [  # big unit, factor, small unit, English
    ("千米", 1000, "米", "kilometre", "metres"), ("米", 100, "厘米", "metre", "centimetres"), ("厘米", 10, "毫米", "centimetre", "millimetres"),
    ("千克", 1000, "克", "kilogram", "grams"), ("吨", 1000, "千克", "tonne", "kilograms"), ("小时", 60, "分钟", "hour", "minutes"),
    ("分钟", 60, "秒", "minute", "seconds"), ("天", 24, "小时", "day", "hours"), ("升", 1000, "毫升", "litre", "millilitres"),
    ("公顷", 10000, "平方米", "hectare", "square metres"), ("周", 7, "天", "week", "days"), ("年", 12, "个月", "year", "months"),
    ("世纪", 100, "年", "century", "years"), ("米", 10, "分米", "metre", "decimetres"), ("分米", 10, "厘米", "decimetre", "centimetres"),
    ("平方米", 100, "平方分米", "square metre", "square decimetres"), ("吨", 2000, "斤", "tonne", "jin"),
    ("千克", 2, "斤", "kilogram", "jin"), ("小时", 3600, "秒", "hour", "seconds"), ("天", 1440, "分钟", "day", "minutes"),
]
ZODIAC = ["鼠", "牛", "虎", "兔", "龙", "蛇", "马", "羊", "猴", "鸡", "狗", "猪"]
ZODIAC_EN = ["Rat", "Ox", "Tiger", "Rabbit", "Dragon", "Snake", "Horse", "Goat", "Monkey", "Rooster", "Dog", "Pig"]
FESTIVALS = [  # festival, date
    ("春节", "农历正月初一"), ("元宵节", "农历正月十五"), ("端午节", "农历五月初五"), ("七夕节", "农历七月初七"),
    ("中秋节", "农历八月十五"), ("重阳节", "农历九月初九"), ("国庆节", "10月1日"), ("劳动节", "5月1日"), ("儿童节", "6月1日"),
    ("植树节", "3月12日"), ("教师节", "9月10日"), ("元旦", "1月1日"),
]
CN_NUM = "零一二三四五六七八九十"


def cn_ordinal(n: int) -> str:
    return CN_NUM[n] if n <= 10 else "十" + CN_NUM[n - 10]


# --------------------------------------------------------------------------- facts as (question, answer, domain)
@dataclass(frozen=True)
class Fact:
    subject: str
    key: str  # identifies the fact across phrasings
    question: str
    answer: str
    domain: tuple[str, ...]  # candidate distractors
    explanation: str


def subject_facts() -> dict[str, list[Fact]]:
    """Every subject's multiple-choice facts, each question phrased in a few ways."""
    facts: dict[str, list[Fact]] = {s: [] for s in SUBJECTS}

    def add(subject, key, question, answer, domain, explanation):
        facts[subject].append(Fact(subject, key, question, answer, tuple(d for d in domain if d != answer), explanation))

    for a in range(1, 10):
        for b in range(1, 10):
            s, p = a + b, a * b
            near = [str(x) for x in range(max(0, s - 4), s + 5)]
            add("high_school_mathematics", f"add{a}{b}", f"计算：{a}+{b}=____", str(s), near, f"{a}加{b}等于{s}。")
            if a >= 2 and b >= 2:
                nearp = sorted({str(x) for x in (p - b, p + b, p - a, p + a, p + 1, p - 1, (a + 1) * b, a * (b + 1)) if x > 0})
                add("high_school_mathematics", f"mul{a}{b}", f"计算：{a}×{b}=____", str(p), nearp, f"{a}乘{b}等于{p}。")
    symbols = [e[1] for e in ELEMENTS]
    numbers = [str(e[2]) for e in ELEMENTS]
    names = [e[0] for e in ELEMENTS]
    for zh, sym, num, _ in ELEMENTS:
        add("high_school_chemistry", f"sym{sym}", f"{zh}元素的元素符号是____", sym, symbols, f"{zh}的元素符号是{sym}。")
        add("high_school_chemistry", f"sym{sym}", f"元素符号为{sym}的元素是____", zh, names, f"{sym}是{zh}的元素符号。")
        add("high_school_chemistry", f"num{sym}", f"{zh}元素的原子序数是____", str(num), numbers, f"{zh}的原子序数是{num}。")
    for big, factor, small, _, _ in UNITS:
        options = [str(factor * m) for m in (1, 10, 100)] + [str(x) for x in (10, 12, 24, 60, 100, 1000, 7, 365, 10000) if x != factor]
        add("metrology_engineer", f"unit{big}{small}", f"1{big}等于____{small}", str(factor), options, f"1{big}等于{factor}{small}。")
    caps = [p[1] for p in PROVINCES]
    provs = [p[0] for p in PROVINCES]
    for prov, cap, _, _ in PROVINCES:
        add("high_school_geography", f"prov{prov}", f"{prov}省的省会是____", cap, caps, f"{prov}省的省会是{cap}。")
        add("high_school_geography", f"prov{prov}", f"{cap}是哪个省的省会____", prov + "省", [p + "省" for p in provs], f"{cap}是{prov}省的省会。")
    ccaps = [c[1] for c in COUNTRIES]
    ctries = [c[0] for c in COUNTRIES]
    for country, cap, _, _ in COUNTRIES:
        add("middle_school_geography", f"cap{country}", f"{country}的首都是____", cap, ccaps, f"{country}的首都是{cap}。")
        add("middle_school_geography", f"cap{country}", f"{cap}是____的首都", country, ctries, f"{cap}是{country}的首都。")
    words = [w for pair in ANTONYMS for w in pair]
    for a, b in ANTONYMS:
        same_len = [w for w in words if len(w) == len(a) and w not in (a, b)]
        add("chinese_language_and_literature", f"ant{a}", f"“{a}”的反义词是____", b, same_len, f"“{a}”和“{b}”意思相反。")
        add("chinese_language_and_literature", f"ant{b}", f"“{b}”的反义词是____", a, same_len, f"“{b}”和“{a}”意思相反。")
    founders = [d[1] for d in DYNASTIES]
    for dyn, founder, _ in DYNASTIES:
        add("high_school_history", f"dyn{dyn}", f"{dyn}的建立者是____", founder, founders, f"{dyn}由{founder}建立。")
    years = [e[1] for e in EVENTS]
    for event, year in EVENTS:
        add("high_school_history", f"event{event}", f"{event}的时间是____", year, years, f"{event}于{year}。")
    for i, animal in enumerate(ZODIAC, start=1):
        add("civil_servant", f"zod{i}", f"十二生肖中排在第{cn_ordinal(i)}位的是____", animal, ZODIAC, f"十二生肖的第{cn_ordinal(i)}位是{animal}。")
    dates = [f[1] for f in FESTIVALS]
    for fest, date in FESTIVALS:
        add("civil_servant", f"fest{fest}", f"{fest}的日期是____", date, dates, f"{fest}在{date}。")
    return facts


# The sample's subjects, all four C-Eval categories: subject -> [English name, Chinese name, category] (C-Eval's own names).
SUBJECTS = {
    "high_school_mathematics": ["High School Mathematics", "高中数学", "STEM"],
    "high_school_chemistry": ["High School Chemistry", "高中化学", "STEM"],
    "metrology_engineer": ["Metrology Engineer", "注册计量师", "STEM"],
    "high_school_geography": ["High School Geography", "高中地理", "Social Science"],
    "middle_school_geography": ["Middle School Geography", "初中地理", "Social Science"],
    "chinese_language_and_literature": ["Chinese Language and Literature", "中国语言文学", "Humanities"],
    "high_school_history": ["High School History", "高中历史", "Humanities"],
    "civil_servant": ["Civil Servant", "公务员", "Other"],
}
LABELS = ("A", "B", "C", "D")
DEV_ROWS = 5
VAL_ROWS = 12


def mc_row(fact: Fact, rng: random.Random, row_id: int, domain: tuple[str, ...] | None = None) -> dict[str, str]:
    """A C-Eval row: the fact's question, its answer and 3 distractors (from the fact's own domain unless `domain`
    is given), shuffled."""
    pool = fact.domain if domain is None else tuple(d for d in domain if d != fact.answer)
    distractors = rng.sample(sorted(set(pool)), 3)
    options = distractors + [fact.answer]
    rng.shuffle(options)
    row = {"id": str(row_id), "question": fact.question}
    row.update(zip(LABELS, options, strict=True))
    row["answer"] = LABELS[options.index(fact.answer)]
    row["explanation"] = fact.explanation
    return row


def row_signature(row: dict[str, str]) -> tuple[str, ...]:
    return (row["question"], *(row[label] for label in LABELS))


def ceval_split(facts: dict[str, list[Fact]]) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """dev (5 rows, with explanation) and val (VAL_ROWS rows, distinct facts, balanced gold letters) per subject."""
    rng = random.Random(SEED)
    dev, val = {}, {}
    for subject, items in facts.items():
        keys = sorted({f.key for f in items})
        rng.shuffle(keys)
        val_keys, dev_keys = keys[:VAL_ROWS], keys[VAL_ROWS:VAL_ROWS + DEV_ROWS]
        by_key = {}
        for f in items:
            by_key.setdefault(f.key, []).append(f)
        dev[subject] = [mc_row(rng.choice(by_key[k]), rng, i) for i, k in enumerate(dev_keys)]
        rows = []
        for i, k in enumerate(val_keys):
            row = mc_row(rng.choice(by_key[k]), rng, i)
            gold = LABELS[i % 4]  # balanced gold letters: a model that always says one letter scores 25%
            j = LABELS.index(row["answer"])
            row[gold], row[LABELS[j]] = row[LABELS[j]], row[gold]
            row["answer"] = gold
            del row["explanation"]
            rows.append(row)
        val[subject] = rows
    return dev, val


# --------------------------------------------------------------------------- prose (C4 format)
EN_OPENERS = [
    "Here is a short note for students who are reviewing for their exams.", "This page collects a few facts that often come up in quizzes.",
    "Our reading group met again this week and we wrote down what we learned.", "Travel tip: knowing a few capitals helps when you plan a trip.",
    "A teacher shared these notes with the class before the holiday.", "Many readers asked us for a simple summary, so here it is.",
]
ZH_OPENERS = ["下面是一份复习笔记，适合准备考试的同学阅读。", "老师在课后整理了这些知识点，供大家参考。", "很多读者希望看到简单的总结，我们把常见的知识写在这里。",
              "这是一篇学习日记，记录了今天学到的内容。", "旅行之前了解一些地理常识会很有帮助。", "小明和同学们一起复习，下面是他们的笔记。"]
EN_LINKS = ["Remember this one.", "It is easy to check.", "Many students know this.", "This fact appears in many textbooks.",
            "Write it down in your notebook.", "We will come back to this later.", "Try to say it out loud."]
ZH_LINKS = ["这一点要记住。", "很多同学都知道。", "课本上也有这个知识点。", "可以把它写在笔记本上。", "考试时经常会考到。", "我们以后还会复习。", "请大家多读几遍。"]


def en_sentences(rng: random.Random) -> list[str]:
    pool = []
    p = rng.choice(PROVINCES)
    pool.append(f"The capital of {p[2]} province is {p[3]}.")
    c = rng.choice(COUNTRIES)
    pool.append(rng.choice([f"The capital of {c[2]} is {c[3]}.", f"{c[3]} is the capital city of {c[2]}."]))
    e = rng.choice(ELEMENTS)
    pool.append(rng.choice([f"The chemical symbol of {e[3]} is {e[1]}.", f"The atomic number of {e[3]} is {e[2]}."]))
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    pool.append(rng.choice([f"{a} plus {b} equals {a + b}.", f"{a} times {b} is {a * b}."]))
    u = rng.choice(UNITS)
    pool.append(f"One {u[3]} is equal to {u[1]} {u[4]}.")
    w = rng.choice(ANTONYMS_EN)
    pool.append(f"The opposite of {w[0]} is {w[1]}.")
    i = rng.randrange(12)
    pool.append(f"In the Chinese zodiac, the {ordinal_en(i + 1)} animal is the {ZODIAC_EN[i]}.")
    return pool


def ordinal_en(n: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(n, f"{n}th")


def zh_sentences(rng: random.Random) -> list[str]:
    pool = []
    p = rng.choice(PROVINCES)
    pool.append(rng.choice([f"{p[0]}省的省会是{p[1]}。", f"{p[1]}是{p[0]}省的省会。"]))
    c = rng.choice(COUNTRIES)
    pool.append(rng.choice([f"{c[0]}的首都是{c[1]}。", f"{c[1]}是{c[0]}的首都。"]))
    e = rng.choice(ELEMENTS)
    pool.append(rng.choice([f"{e[0]}的元素符号是{e[1]}。", f"{e[0]}的原子序数是{e[2]}。", f"{e[1]}是{e[0]}的元素符号。"]))
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    pool.append(rng.choice([f"{a}加{b}等于{a + b}。", f"{a}+{b}={a + b}。", f"{a}乘{b}等于{a * b}。", f"{a}×{b}={a * b}。"]))
    u = rng.choice(UNITS)
    pool.append(f"1{u[0]}等于{u[1]}{u[2]}。")
    w = rng.choice(ANTONYMS)
    pool.append(rng.choice([f"“{w[0]}”的反义词是“{w[1]}”。", f"“{w[1]}”的反义词是“{w[0]}”。"]))
    d = rng.choice(DYNASTIES)
    pool.append(rng.choice([f"{d[0]}的建立者是{d[1]}。", f"{d[0]}的都城是{d[2]}。"]))
    ev = rng.choice(EVENTS)
    pool.append(f"{ev[0]}的时间是{ev[1]}。")
    i = rng.randrange(12)
    pool.append(f"十二生肖中排在第{cn_ordinal(i + 1)}位的是{ZODIAC[i]}。")
    f = rng.choice(FESTIVALS)
    pool.append(f"{f[0]}的日期是{f[1]}。")
    return pool


def prose_doc(rng: random.Random, chinese: bool) -> str:
    """One C4-style document: an opener, then paragraphs of fact sentences and filler."""
    paragraphs = []
    opener = rng.choice(ZH_OPENERS if chinese else EN_OPENERS)
    for _ in range(rng.randint(6, 10)):
        sents = []
        for _ in range(rng.randint(5, 9)):
            sents.append(rng.choice(zh_sentences(rng) if chinese else en_sentences(rng)))
            if rng.random() < 0.25:
                sents.append(rng.choice(ZH_LINKS if chinese else EN_LINKS))
        paragraphs.append(("" if chinese else " ").join(sents))
    return opener + "\n" + "\n".join(paragraphs)


def c4_records(rng: random.Random, count: int, start_day: int) -> list[dict[str, str]]:
    docs = []
    for i in range(count):
        chinese = i % 3 == 2  # two English documents for each Chinese one (C4 itself is English)
        day = start_day + i
        docs.append({"text": prose_doc(rng, chinese),
                     "timestamp": f"2019-{1 + day % 12:02d}-{1 + day % 28:02d}T{day % 24:02d}:{(7 * day) % 60:02d}:{(13 * day) % 60:02d}Z",
                     "url": f"https://notes.example.org/{'zh' if chinese else 'en'}/{day:05d}-study-notes"})
    return docs


# --------------------------------------------------------------------------- alpaca / ShareGPT
def alpaca_records(rng: random.Random, count: int) -> list[dict[str, str]]:
    makers = [
        lambda: (lambda c: {"instruction": f"What is the capital of {c[2]}?", "input": "",
                            "output": f"The capital of {c[2]} is {c[3]}."})(rng.choice(COUNTRIES)),
        lambda: (lambda p: {"instruction": f"{p[0]}省的省会是哪里？", "input": "", "output": f"{p[0]}省的省会是{p[1]}。"})(rng.choice(PROVINCES)),
        lambda: (lambda w: {"instruction": "Give the antonym of the word.", "input": w[0],
                            "output": f"The antonym of \"{w[0]}\" is \"{w[1]}\"."})(rng.choice(ANTONYMS_EN)),
        lambda: (lambda w: {"instruction": "写出下面词语的反义词。", "input": w[0], "output": f"“{w[0]}”的反义词是“{w[1]}”。"})(rng.choice(ANTONYMS)),
        lambda: (lambda e: {"instruction": "Give the chemical symbol and atomic number of the element.", "input": e[3],
                            "output": f"The chemical symbol of {e[3]} is {e[1]} and its atomic number is {e[2]}."})(rng.choice(ELEMENTS)),
        lambda: (lambda a, b: {"instruction": "计算下面的算式。", "input": f"{a}+{b}", "output": f"{a}+{b}={a + b}。"})(
            rng.randint(1, 9), rng.randint(1, 9)),
        lambda: (lambda a, b: {"instruction": f"What is {a} times {b}?", "input": "", "output": f"{a} times {b} is {a * b}."})(
            rng.randint(2, 9), rng.randint(2, 9)),
        lambda: (lambda u: {"instruction": "Convert the quantity to the smaller unit.", "input": f"1 {u[3]}",
                            "output": f"1 {u[3]} is equal to {u[1]} {u[4]}."})(rng.choice(UNITS)),
        lambda: (lambda f: {"instruction": f"{f[0]}是哪一天？", "input": "", "output": f"{f[0]}的日期是{f[1]}。"})(rng.choice(FESTIVALS)),
        lambda: (lambda d: {"instruction": "说出这个朝代的建立者和都城。", "input": d[0],
                            "output": f"{d[0]}的建立者是{d[1]}，都城是{d[2]}。"})(rng.choice(DYNASTIES)),
        lambda: {"instruction": "List the twelve animals of the Chinese zodiac in order.", "input": "",
                 "output": ", ".join(ZODIAC_EN) + "."},
        lambda: (lambda cs: {"instruction": "Write a short paragraph about the capitals of these countries.",
                             "input": ", ".join(c[2] for c in cs),
                             "output": " ".join(f"The capital of {c[2]} is {c[3]}." for c in cs)})(rng.sample(COUNTRIES, 3)),
    ]
    return [makers[rng.randrange(len(makers))]() for _ in range(count)]


def sharegpt_entries(rng: random.Random, count: int) -> list[dict]:
    """ShareGPT V3-shaped conversations: mostly human-first multi-turn, a few one-turn, gpt-first and system-first."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    entries = []
    base = "".join(rng.choice(alphabet) for _ in range(7))
    for i in range(count):
        if i % 4 == 0:
            base = "".join(rng.choice(alphabet) for _ in range(7))
        turns = []
        pairs = rng.choice([1, 1, 2, 2, 3, 4, 6])
        for _ in range(pairs):
            rec = alpaca_records(rng, 1)[0]
            question = rec["instruction"] + (f"\n{rec['input']}" if rec["input"] else "")
            extra = rng.randint(0, 5)
            answer = rec["output"] + " " + " ".join(rng.choice(en_sentences(rng) + zh_sentences(rng)) for _ in range(extra))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer.strip()}]
        if i % 13 == 5:
            turns = turns[:1]  # one-turn entry (no reply), as the real file has
        elif i % 13 == 7:
            turns = turns[1:]  # starts with gpt (the split cut the human turn off)
        elif i % 13 == 11:
            turns = [{"from": "system", "value": "You are a helpful assistant. Answer briefly."}] + turns
        entries.append({"id": f"{base}_{i % 4}", "conversations": turns})
    return entries


# --------------------------------------------------------------------------- writing the samples
def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def gzip_jsonl(records: list[dict]) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    return gzip.compress(text.encode("utf-8"), mtime=0)  # mtime=0: byte-identical on every run


def csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] for c in columns])
    return buf.getvalue().encode("utf-8")


HELD_OUT_C4_DOCS = 48
TRAIN_C4_DOCS = 150
C4_TRAIN_SAMPLE = 40  # shipped as the C4 train split (calibration), as GPTQ calibrates on c4-train
ALPACA_SAMPLE = 240
ALPACA_TRAIN = 400
SHAREGPT_SAMPLE = 60


def make_corpora() -> dict:
    """All text, deterministically: shipped samples and the (not shipped) training corpora."""
    facts = subject_facts()
    dev, val = ceval_split(facts)
    c4_heldout = c4_records(random.Random(SEED + 1), HELD_OUT_C4_DOCS, start_day=0)
    c4_train = c4_records(random.Random(SEED + 2), TRAIN_C4_DOCS, start_day=1000)
    alpaca_sample = alpaca_records(random.Random(SEED + 3), ALPACA_SAMPLE)
    alpaca_train = alpaca_records(random.Random(SEED + 4), ALPACA_TRAIN)
    sharegpt = sharegpt_entries(random.Random(SEED + 5), SHAREGPT_SAMPLE)
    return {"facts": facts, "dev": dev, "val": val, "c4_heldout": c4_heldout, "c4_train": c4_train,
            "alpaca_sample": alpaca_sample, "alpaca_train": alpaca_train, "sharegpt": sharegpt}


SAMPLES_README = """# llmship sample data (generated by scripts/make_embedded_model.py; written for this project)

Each folder holds one source in its real format, small enough to ship. All text is generated from the fact tables
in the script (provinces and capitals, world capitals, elements, arithmetic, units, antonyms, dynasties, festivals,
the zodiac), in English and Chinese.

| folder | format | used for | seen in training of tiny-llama-zh? |
|---|---|---|---|
| `c4/c4-validation.sample.json.gz` | gzip JSON lines `{{"text","timestamp","url"}}`, {c4} documents | held-out perplexity (eval) | **no (held out)** |
| `c4/c4-train.sample.json.gz` | same format, {c4_train} documents | calibration (the train split, as GPTQ) | yes |
| `ceval/dev/<subject>_dev.csv` | `id,question,A,B,C,D,answer,explanation`, 5 rows per subject | in-context examples, calibration | yes (examples) |
| `ceval/val/<subject>_val.csv` | `id,question,A,B,C,D,answer`, {val} rows per subject | scored questions | **no (held out)**: each val row's question+options never occurs in the training text |
| `ceval/subject_mapping.json` | subject -> [English name, Chinese name, category] | names and groups | - |
| `alpaca/alpaca_data_cleaned_sample.json` | JSON list of `{{"instruction","input","output"}}`, {alpaca} records | calibration (4 in 5 records) and alpaca perplexity (the other fifth: `sources.alpaca_part`) | **no (held out)** (drawn with another seed; some short records coincide with training records by chance) |
| `sharegpt/sharegpt_v3_sample.json` | JSON list of `{{"id","conversations":[{{"from","value"}}]}}`, {sharegpt} entries | bench | no |

C-Eval subjects: {subjects}. The val questions are new multiple-choice questions over facts that the training text
states: their option sets and orders never appear in training, and their gold letters are balanced (A, B, C, D in
turn), so always answering one letter scores 25%.

ShareGPT: mostly human-first multi-turn conversations of varying length; entries {one_turn} have one turn, entries
{gpt_first} start with gpt and entries {system_first} with system, and ids carry `_N` suffixes, as in the real file.
"""


def write_samples(corpora: dict) -> None:
    write_bytes(SAMPLES / "c4" / "c4-validation.sample.json.gz", gzip_jsonl(corpora["c4_heldout"]))
    write_bytes(SAMPLES / "c4" / "c4-train.sample.json.gz", gzip_jsonl(corpora["c4_train"][:C4_TRAIN_SAMPLE]))
    for subject in SUBJECTS:
        write_bytes(SAMPLES / "ceval" / "dev" / f"{subject}_dev.csv",
                    csv_bytes(corpora["dev"][subject], ["id", "question", "A", "B", "C", "D", "answer", "explanation"]))
        write_bytes(SAMPLES / "ceval" / "val" / f"{subject}_val.csv",
                    csv_bytes(corpora["val"][subject], ["id", "question", "A", "B", "C", "D", "answer"]))
    write_bytes(SAMPLES / "ceval" / "subject_mapping.json", json.dumps(SUBJECTS, ensure_ascii=False, indent="\t").encode("utf-8"))
    write_bytes(SAMPLES / "alpaca" / "alpaca_data_cleaned_sample.json",
                json.dumps(corpora["alpaca_sample"], ensure_ascii=False, indent=4).encode("utf-8"))
    write_bytes(SAMPLES / "sharegpt" / "sharegpt_v3_sample.json", json.dumps(corpora["sharegpt"], ensure_ascii=False, indent=2).encode("utf-8"))
    shape = [e["conversations"][0]["from"] if e["conversations"] else "" for e in corpora["sharegpt"]]
    readme = SAMPLES_README.format(
        c4=HELD_OUT_C4_DOCS, c4_train=C4_TRAIN_SAMPLE, val=VAL_ROWS, alpaca=ALPACA_SAMPLE, sharegpt=SHAREGPT_SAMPLE,
        subjects=", ".join(f"`{s}` ({v[2]})" for s, v in SUBJECTS.items()),
        one_turn=", ".join(str(i) for i, e in enumerate(corpora["sharegpt"]) if len(e["conversations"]) == 1),
        gpt_first=", ".join(str(i) for i, s in enumerate(shape) if s == "gpt"),
        system_first=", ".join(str(i) for i, s in enumerate(shape) if s == "system"))
    write_bytes(SAMPLES / "README.md", readme.encode("utf-8"))


# --------------------------------------------------------------------------- training text
def mc_training_chains(corpora: dict, rng: random.Random, count: int) -> list[str]:
    """C-Eval-format texts: k examples of one subject joined as the PPL prompt joins them, each with freshly drawn
    options; rows whose question+options equal a val row are skipped, so val questions stay unseen.

    Curriculum: a share of the rows (EASY_DISTRACTORS) take their distractors from every subject's answers, so most
    wrong options are of another kind (a year among capitals). Telling the kinds apart is easy, and it teaches what
    the model otherwise learns very slowly: to answer with the letter of the option it picked. Measured: with
    same-kind distractors only, the model stayed at 25% (one letter for everything) through 2,500 steps; with half
    of the rows easy it left chance after ~1,000 steps. The shipped val rows keep same-kind distractors.
    A quarter of the chains (GEN_CHAINS) are joined as the GEN-mode prompt is, so both OpenCompass modes are seen."""
    val_signatures = {row_signature(r) for rows in corpora["val"].values() for r in rows}
    every_answer = tuple(sorted({f.answer for facts in corpora["facts"].values() for f in facts}))
    subjects = list(SUBJECTS)
    texts = []
    for i in range(count):
        subject = subjects[i % len(subjects)]
        name_zh = SUBJECTS[subject][1]
        facts = corpora["facts"][subject]
        k = rng.randint(1, 6)
        examples = []
        while len(examples) < k:
            domain = every_answer if rng.random() < EASY_DISTRACTORS else None
            row = mc_row(rng.choice(facts), rng, len(examples), domain)
            if row_signature(row) not in val_signatures:
                examples.append(templates.ceval_example(row, name_zh))
        if rng.random() < GEN_CHAINS:  # joined as the GEN-mode prompt joins them: one newline everywhere
            texts.append(templates.CEVAL_GEN_SEPARATOR.join(examples) if len(examples) > 1 else "\n" + examples[0])
            continue
        # Same joins as the PPL-mode prompt: 3 newlines between examples, 5 before the last one (the "test").
        text = templates.CEVAL_PPL_EXAMPLE_SEPARATOR.join(examples[:-1])
        text = text + templates.CEVAL_PPL_TEST_SEPARATOR + examples[-1] if len(examples) > 1 else "\n\n" + examples[-1]
        texts.append(text)
    return texts


def training_texts(corpora: dict, mc_count: int) -> list[str]:
    rng = random.Random(SEED + 6)
    texts = [d["text"] for d in corpora["c4_train"]]
    texts += [templates.alpaca_prompt(r) + r["output"] for r in corpora["alpaca_train"]]
    texts += mc_training_chains(corpora, rng, mc_count)
    # dev rows are the in-context examples; the model may see them as text.
    for subject, rows in corpora["dev"].items():
        texts += [templates.ceval_example(r, SUBJECTS[subject][1]) for r in rows]
    rng.shuffle(texts)
    return texts


# --------------------------------------------------------------------------- tokenizer
VOCAB_SIZE = 3000


def train_tokenizer(texts: list[str], out: Path) -> Path:
    """A LLaMA-style SentencePiece BPE model: byte fallback, digits split, dummy prefix, no normalisation."""
    import sentencepiece as spm

    work = out / "_spm"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "tokenizer"), model_type="bpe", vocab_size=VOCAB_SIZE,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=100000, minloglevel=2)
    return work / "tokenizer.model"


def save_model_folder(model, work: Path) -> None:
    """Write the trained model and its tokenizer files into `work`, then drop the training scratch folders."""
    import shutil

    save_tokenizer(work / "_spm" / "tokenizer.model", work)
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(work), safe_serialization=True)
    for scratch in ("_spm", "_tok"):
        shutil.rmtree(work / scratch, ignore_errors=True)


def save_tokenizer(spm_file: Path, out: Path) -> None:
    """tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json: LlamaTokenizer and AutoTokenizer
    both give SentencePiece's own ids with BOS in front (the test checks it)."""
    from transformers import LlamaTokenizer

    staging = out / "_tok"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "tokenizer.model").write_bytes(spm_file.read_bytes())
    tok = LlamaTokenizer.from_pretrained(str(staging), add_bos_token=True, add_eos_token=False, legacy=True)
    tok.save_pretrained(str(staging))
    (out / "tokenizer.model").write_bytes(spm_file.read_bytes())
    (out / "tokenizer.json").write_bytes((staging / "tokenizer.json").read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True, "add_prefix_space": None,
              "clean_up_tokenization_spaces": False, "model_max_length": MAX_POSITIONS, "padding_side": "left",
              "sp_model_kwargs": {}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- model and training
MAX_POSITIONS = 1024
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
SEQ_LEN = 320  # a 5-shot prompt of the sample is 214-301 tokens
BATCH = 12
STEPS = 3000
DECAY_SHARE = 0.3  # the last 30% of the steps decay the learning rate (see learning_rate)
LR = 4e-3
WARMUP = 15
MC_CHAINS = 8000
EASY_DISTRACTORS = 0.6  # share of training MC rows whose distractors come from other subjects (see mc_training_chains)
ANSWER_WEIGHT = 10.0  # loss weight of a C-Eval answer letter (see token_stream)
GEN_CHAINS = 0.25  # share of MC chains joined as the GEN-mode prompt (one newline) instead of the PPL-mode one
PROGRESS_EVERY = 300  # steps between the val accuracy lines in the log (reported only, never used to pick a model)


def model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
                       hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                       initializer_range=0.02, attention_bias=False, mlp_bias=False, **MODEL_SHAPE)


ANSWER_MARKER = "答案: \n"  # the C-Eval prompt's "答案: " + the "\n" before the gold letter


def token_stream(texts: list[str], sp) -> tuple[list[int], list[float]]:
    """Every text as the model will see it at eval time: BOS + SentencePiece ids; documents end with EOS.

    With each id its loss weight: ANSWER_WEIGHT for the answer letter of a C-Eval-format example (the one token the
    multiple-choice skill is learnt from, 2% of the MC text), 1 elsewhere."""
    letters = {sp.piece_to_id(p) for label in LABELS for p in (label, "\u2581" + label)} - {sp.unk_id()}
    marker = ANSWER_MARKER.encode("utf-8")
    ids: list[int] = []
    weights: list[float] = []
    for text in texts:
        raw = text.encode("utf-8")
        starts, at = set(), raw.find(marker)
        while at >= 0:  # byte offsets: SentencePiece's pieces carry byte spans
            starts.add(at + len(marker))
            at = raw.find(marker, at + 1)
        ids.append(sp.bos_id())
        weights.append(1.0)
        for piece in sp.encode(text, return_type="proto").pieces:
            ids.append(piece.id)
            weights.append(ANSWER_WEIGHT if piece.begin in starts and piece.id in letters else 1.0)
        ids.append(sp.eos_id())
        weights.append(1.0)
    return ids, weights


def learning_rate(step: int, steps: int) -> float:
    """Warm-up, then constant, then a cosine decay over the last DECAY_SHARE of the steps (warmup-stable-decay): the
    multiple-choice skill appears late (after ~1,000 steps), and a cosine over the whole run had lowered the rate
    too far by then (45.8% after 2,400 steps)."""
    decay_start = int(steps * (1 - DECAY_SHARE))
    warm = min(1.0, (step + 1) / WARMUP)
    if step < decay_start:
        return LR * warm
    return LR * warm * 0.5 * (1 + math.cos(math.pi * (step - decay_start) / max(1, steps - decay_start)))


def train(corpora: dict, args: argparse.Namespace) -> None:
    import numpy as np
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    out: Path = args.out
    work = out.with_name(out.name + ".tmp")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    texts = training_texts(corpora, MC_CHAINS)
    sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer(texts, work)))
    ids, weights = token_stream(texts, sp)
    usable = len(ids) // SEQ_LEN * SEQ_LEN
    blocks = torch.from_numpy(np.array(ids[:usable], dtype=np.int64).reshape(-1, SEQ_LEN))
    block_weights = torch.from_numpy(np.array(weights[:usable], dtype=np.float32).reshape(-1, SEQ_LEN))
    log(f"tokenizer: {sp.get_piece_size()} pieces; training stream {len(ids)} tokens in {len(blocks)} blocks of {SEQ_LEN}, "
        f"{sum(w > 1 for w in weights)} answer letters weighted {ANSWER_WEIGHT:g}")
    model = LlamaForCausalLM(model_config(sp.get_piece_size())).float()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params} parameters ({params * 4 / 1e6:.1f} MB fp32)")
    steps = args.steps or STEPS
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(blocks), generator=generator)
    model.train()
    for step in range(steps):
        lr = learning_rate(step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        index = torch.arange(step * BATCH, (step + 1) * BATCH) % len(blocks)
        if step and (step * BATCH) // len(blocks) != ((step + 1) * BATCH - 1) // len(blocks):
            order = torch.randperm(len(blocks), generator=generator)
        batch, weight = blocks[order[index]], block_weights[order[index]][:, 1:]
        logits = model(input_ids=batch).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="none").view_as(weight)
        loss = (token_loss * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.3f} lr {lr:.2e} ({time.time() - started:.0f} s)")
        if (step + 1) % PROGRESS_EVERY == 0:
            log(f"step {step + 1}: C-Eval val accuracy (PPL mode) {val_accuracy(model, sp, corpora):.1f}%")
    model.eval()
    train_seconds = time.time() - started
    save_model_folder(model, work)
    figures = measure(work, corpora)
    figures.update(train_seconds=round(train_seconds, 1), params=params, steps=steps, threads=args.threads)
    write_model_card(work, figures)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(work, out)
    log(json.dumps(figures))


def val_accuracy(model, sp, corpora: dict) -> float:
    """PPL-mode accuracy on the shipped val rows during training, with SentencePiece itself as the tokenizer."""

    class Encoded:
        def __init__(self, text: str):
            self.input_ids = [sp.bos_id(), *sp.encode(text)]

    model.eval()
    rows = [(SUBJECTS[s][1], corpora["dev"][s], row) for s in SUBJECTS for row in corpora["val"][s]]
    correct = sum(ceval_ppl_choice(model, Encoded, zh, dev, row) == row["answer"] for zh, dev, row in rows)
    model.train()
    return 100 * correct / len(rows)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(folder: Path, corpora: dict) -> dict:
    """Held-out perplexity (GPTQ rule on the shipped C4 sample) and C-Eval-format PPL-mode accuracy on the shipped val."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ppl = heldout_perplexity(model, tok, [d["text"] for d in corpora["c4_heldout"]])
    correct = gen_correct = total = 0
    for subject, (_, name_zh, _) in SUBJECTS.items():
        for row in corpora["val"][subject]:
            total += 1
            correct += ceval_ppl_choice(model, tok, name_zh, corpora["dev"][subject], row) == row["answer"]
            gen_correct += ceval_gen_choice(model, tok, name_zh, corpora["dev"][subject], row) == row["answer"]
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"heldout_ppl": round(ppl, 3), "uniform_ppl": tok.vocab_size if hasattr(tok, "vocab_size") else None,
            "ceval_ppl_accuracy": round(100 * correct / total, 2), "ceval_gen_accuracy": round(100 * gen_correct / total, 2),
            "ceval_questions": total, "size_bytes": size}


PPL_SEQ_LEN = 256


def heldout_perplexity(model, tok, texts: list[str]) -> float:
    """GPTQ llama_eval style: docs joined by "\\n\\n", tokenized once, non-overlapping windows, exp(mean CE)."""
    import torch

    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    n = len(ids) // PPL_SEQ_LEN
    windows = ids[: n * PPL_SEQ_LEN].reshape(n, PPL_SEQ_LEN)
    losses = []
    with torch.no_grad():
        for w in windows:
            losses.append(model(input_ids=w[None], labels=w[None]).loss.item())
    return float(math.exp(sum(losses) / len(losses)))


def ceval_ppl_choice(model, tok, name_zh: str, dev: list[dict], row: dict) -> str:
    """OpenCompass PPL mode: mean CE over every prompt token (BOS counted in the divisor), argmin over A-D.

    The four prompts differ only in their last token, so one forward gives all four scores exactly."""
    import torch
    import torch.nn.functional as F

    prompts = [tok(templates.ceval_ppl_prompt(name_zh, dev[: templates.CEVAL_SHOTS], row, label)).input_ids for label in LABELS]
    if any(p[:-1] != prompts[0][:-1] for p in prompts):
        raise RuntimeError("candidate prompts differ before their last token")
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    prefix = F.cross_entropy(logits[:-2], ids[0, 1:-1], reduction="sum").item()
    last = torch.log_softmax(logits[-2], dim=-1)
    scores = [(prefix - last[p[-1]].item()) / len(p) for p in prompts]
    return LABELS[scores.index(min(scores))]


def ceval_gen_choice(model, tok, name_zh: str, dev: list[dict], row: dict) -> str | None:
    """OpenCompass GEN mode: greedy continuation, prediction = its first capital letter."""
    import torch

    ids = torch.tensor([tok(templates.ceval_gen_prompt(name_zh, dev[: templates.CEVAL_SHOTS], row)).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return next((ch for ch in text if ch.isupper()), None)


MODEL_CARD = """# tiny-llama-zh: llmship's embedded default model

A {params:,}-parameter LlamaForCausalLM (GQA: {heads} query heads / {kv} key-value heads, RMSNorm, RoPE, SwiGLU,
hidden {hidden}, {layers} layers, {max_pos} positions) with a {vocab}-piece SentencePiece BPE tokenizer (byte fallback,
Chinese + English), trained from scratch by `scripts/make_embedded_model.py` on llmship's own generated corpora.
It exists so that the whole chain (export, quantization, eval, bench) runs offline and a quantization regression is
visible; it knows only the facts in the script's tables.

| figure | value |
|---|---|
| weights | fp32 safetensors, {size_mb:.2f} MB folder total |
| held-out perplexity (shipped `samples/c4/c4-validation.sample.json.gz`, not trained on; GPTQ rule, {ppl_len}-token windows) | {heldout_ppl} (uniform: {vocab}) |
| C-Eval-format accuracy, PPL mode, 5-shot (shipped `samples/ceval` val, {ceval_questions} questions; chance 25%) | {ceval_ppl_accuracy}% |
| C-Eval-format accuracy, GEN mode, 5-shot (same questions; first capital letter of 8 greedy tokens) | {ceval_gen_accuracy}% |
| training | {steps} steps x {batch} x {seq_len} tokens, {train_seconds:.0f} s on {threads} CPU thread(s) |

Regenerate (deterministic for a given torch version and thread count):

    python scripts/make_embedded_model.py --threads {threads}

Training text: {c4_docs} generated C4-style documents, {alpaca} alpaca-style records and {mc} C-Eval-format question
chains (options drawn afresh; any chain row equal to a shipped val row is skipped; {easy:.0%} of the rows with
distractors of another kind, a curriculum for answering with a letter; {gen:.0%} of the chains joined as GEN-mode
prompts; the answer letter's loss weighted {answer_weight:g}x), plus the shipped C-Eval dev rows. Learning rate
{lr:g}, constant after {warmup} warm-up steps, cosine decay over the last {decay:.0%}. Not trained on: `samples/c4/c4-validation.sample.json.gz`, `samples/alpaca`, the C-Eval val rows, `samples/sharegpt`.
"""


def write_model_card(folder: Path, figures: dict) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    text = MODEL_CARD.format(
        params=figures["params"], heads=cfg["num_attention_heads"], kv=cfg["num_key_value_heads"], hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"], max_pos=cfg["max_position_embeddings"], vocab=cfg["vocab_size"],
        size_mb=figures["size_bytes"] / 1e6, ppl_len=PPL_SEQ_LEN, heldout_ppl=figures["heldout_ppl"],
        ceval_questions=figures["ceval_questions"], ceval_ppl_accuracy=figures["ceval_ppl_accuracy"], steps=figures["steps"],
        batch=BATCH, seq_len=SEQ_LEN, train_seconds=figures["train_seconds"], threads=figures["threads"],
        c4_docs=TRAIN_C4_DOCS, alpaca=ALPACA_TRAIN, mc=MC_CHAINS, answer_weight=ANSWER_WEIGHT, easy=EASY_DISTRACTORS,
        gen=GEN_CHAINS, lr=LR, warmup=WARMUP, decay=DECAY_SHARE,
        ceval_gen_accuracy=figures["ceval_gen_accuracy"])
    (folder / "README.md").write_text(text, encoding="utf-8")
    (folder / "training_figures.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-only", action="store_true", help="write the sample data and stop")
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="model folder to write")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results are deterministic per thread count)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the documented recipe)")
    args = parser.parse_args()
    corpora = make_corpora()
    write_samples(corpora)
    print(f"samples written under {SAMPLES}", file=sys.stderr)
    if args.samples_only:
        return
    train(corpora, args)


if __name__ == "__main__":
    main()
