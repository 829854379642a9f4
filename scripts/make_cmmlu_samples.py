"""Writes the bundled CMMLU-format sample, llmship/assets/samples/cmmlu/{dev,test}/{subject}.csv (seconds).

    python scripts/make_cmmlu_samples.py

All questions are original (written for llmship), not taken from CMMLU. Format as in the real CMMLU release:
header ',Question,A,B,C,D,Answer' (first column unnamed = 0-based row index), UTF-8 without BOM, csv module
QUOTE_MINIMAL quoting, '\n' line endings (pandas' DataFrame.to_csv style; csv.reader accepts '\r\n' too).
"""
import csv
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "llmship" / "assets" / "samples" / "cmmlu"

DATA = {
    # STEM (subcategory math)
    "elementary_mathematics": {
        "dev": [
            ("3 + 5 = ?", "6", "7", "8", "9", "C"),
            ("12 ÷ 4 = ?", "4", "3", "6", "8", "B"),
            ("一个正方形的边长是 2 厘米，它的周长是多少厘米？", "4", "6", "8", "10", "C"),
            ("下列数中最大的是", "0.5", "0.45", "0.405", "0.054", "A"),
            ("7 × 6 = ?", "36", "40", "48", "42", "D"),
        ],
        "test": [
            ("小明有 10 个苹果，吃掉 3 个，还剩几个？", "7", "6", "8", "13", "A"),
            ("下列数中是偶数的是", "15", "21", "33", "48", "D"),
            ("1 米等于多少厘米？", "10", "100", "1000", "10000", "B"),
            ("计算：\n(2 + 3) × 4 = ?", "14", "24", "20", "9", "C"),
        ],
    },
    # Humanities (subcategory history)
    "world_history": {
        "dev": [
            ("古代金字塔主要分布在下列哪个国家？", "埃及", "法国", "巴西", "日本", "A"),
            ("第一次世界大战爆发于哪一年？", "1900年", "1914年", "1939年", "1945年", "B"),
            ("“文艺复兴”最早兴起于哪个国家？", "英国", "德国", "意大利", "俄国", "C"),
            ("哥伦布在哪一年到达美洲？", "1492年", "1588年", "1688年", "1789年", "A"),
            ("工业革命最早开始于哪个国家？", "美国", "法国", "日本", "英国", "D"),
        ],
        "test": [
            ("第二次世界大战结束于哪一年？", "1918年", "1939年", "1945年", "1949年", "C"),
            ("古罗马的首都是", "雅典", "罗马", "开罗", "巴黎", "B"),
            ("“美国独立宣言”发表于哪一年？", "1776年", "1789年", "1815年", "1861年", "A"),
            ("下列哪一项是古代埃及的文字？", "楔形文字", "甲骨文", "拉丁字母", "象形文字", "D"),
        ],
    },
    # Social Science (subcategory economics)
    "economics": {
        "dev": [
            ("商品的价格上涨时，一般来说其需求量会", "增加", "减少", "不变", "先减后增", "B"),
            ("通货膨胀是指", "物价总水平持续上涨", "物价总水平持续下降", "失业率上升", "利率下降", "A"),
            ("国内生产总值的英文缩写是", "CPI", "PPI", "GDP", "PMI", "C"),
            ("下列属于货币基本职能的是", "价值尺度", "生产资料", "劳动对象", "固定资产", "A"),
            ("银行提高存款利率，一般会使居民储蓄", "减少", "不变", "消失", "增加", "D"),
        ],
        "test": [
            ("供给大于需求时，商品价格通常会", "上涨", "下降", "不变", "翻倍", "B"),
            ("下列属于直接税的是", "个人所得税", "增值税", "消费税", "关税", "A"),
            ("“看不见的手”通常指的是", "政府调控", "行业协会", "市场机制", "国际组织", "C"),
            ("消费者物价指数的英文缩写是", "GDP", "GNP", "M2", "CPI", "D"),
        ],
    },
    # Other + China specific (subcategories other, china specific)
    "chinese_driving_rule": {
        "dev": [
            ("遇到红灯时，机动车应当", "加速通过", "停车等待", "鸣笛通过", "倒车", "B"),
            ("在我国，机动车应当靠道路的哪一侧行驶？", "左侧", "中间", "右侧", "任意一侧", "C"),
            ("驾驶机动车时，驾驶人应当", "系好安全带", "接听手机", "吸烟", "看视频", "A"),
            ("饮酒后驾驶机动车的行为是", "允许的", "提倡的", "无所谓的", "违法的", "D"),
            ("黄灯持续闪烁时，车辆应当", "注意瞭望，确认安全后通过", "加速通过", "掉头", "停在路口中间", "A"),
        ],
        "test": [
            ("遇到行人正在通过人行横道时，机动车应当", "鸣笛催促", "停车让行", "加速通过", "绕行", "B"),
            ("在高速公路上，下列行为正确的是", "在应急车道停车休息", "倒车", "按规定车道行驶", "逆行", "C"),
            ("驾驶证被注销后，驾驶人", "仍可驾驶", "可以驾驶摩托车", "可借用他人驾驶证驾驶", "不得驾驶机动车", "D"),
            ('标志牌上写着"限速60"，表示最高车速为每小时多少公里？', "60", "80", "100", "120", "A"),
        ],
    },
}


def main() -> None:
    for subject, splits in DATA.items():
        for split, rows in splits.items():
            folder = HERE / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{subject}.csv", "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, row in enumerate(rows):
                    assert len(row) == 6 and row[5] in "ABCD"
                    writer.writerow([i, *row])


if __name__ == "__main__":
    main()
