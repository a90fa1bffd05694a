using System.Text;

namespace FrugalLM.Tests.Tokenization;

/// <summary>Text for tokenizer tests: fresh random mixtures of scripts, emoji and whitespace, edge cases, and packaged corpora.</summary>
internal static class TestText
{
    /// <summary>Cases that trip byte-level tokenizers: whitespace runs, contractions, split characters, specials.</summary>
    public static readonly string[] EdgeCases =
    [
        "",
        " ",
        "   ",
        "\n",
        "\n\n\n",
        "\r\n",
        "\t\t x",
        "Hello world",
        " Hello  world   ",
        "trailing spaces   ",
        "don't I'll we've they're she's he'd you'm O'Neill IT'S",
        "1234567890 3.14159 1,000,000 007",
        "naïve café résumé Ångström Łódź",
        "e\u0301 a\u0308 n\u0303 (combining marks)",
        "日本語のテキスト、中文文本。한국어 텍스트",
        "Ελληνικά и русский текст",
        "עברית العربية हिन्दी ไทย",
        "😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🏳️‍🌈",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 𠀀𠀁",
        "\u00a0non-breaking\u00a0spaces\u3000ideographic",
        "zero\u200bwidth\u200djoiner\ufeffbom",
        "control \u0001\u0002\u001f chars \u007f",
        "<|endoftext|>",
        "before<|endoftext|>after",
        "<|endoftext|><|endoftext|> twice",
        "<|endoft ext|> not special",
        "mixed\tTabs\nand\r\nnewlines  \n  indented",
        "code: for (int i = 0; i < n; i++) { x += a[i] * b[i]; }",
        "URL https://example.com/path?q=1&r=2#frag and email a.b@c.de",
        "𝕏 ℵ ∑ ∫ √ ≠ ≤ ≥ ∞ → ⇒",
    ];

    private static readonly string[] s_words =
    [
        "the", "and", "of", "to", "LORD", "said", "unto", "him", "thee", "thou", "shall", "God", "begat",
        "quick", "brown", "fox", "tokenizer", "FrugalLM", "memory", "gradient", "Übermensch", "façade",
        "niño", "coöperate", "straße", "señor", "déjà", "vu", "Hello", "WORLD", "mIxEd", "snake_case",
        "camelCase", "kebab-case",
    ];

    private static readonly string[] s_pieces =
    [
        "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "’s", ",", ".", "!", "?", ";", ":", "...", "--", "—",
        "(", ")", "[", "]", "{", "}", "\"", "'", "`", "#", "$", "%", "&", "*", "+", "=", "/", "\\", "|", "~", "^",
        "<", ">", "@", "_", "1", "42", "2024", "3.5", "½", "²", "٣", "०",
        " ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2028", " \n ",
        "é", "ü", "ñ", "ç", "ø", "Œ", "ß", "ſ", "ﬁ", "Ｆ", "ｶ", "α", "Ω", "ж", "Я", "ש", "ع", "क", "ก", "ㄱ", "가",
        "中", "文", "日本", "語", "😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "🤖", "🧠", "∑", "√",
        "e\u0301", "\u200b", "\u200d", "<|endoftext|>",
    ];

    /// <summary>
    /// <paramref name="lines"/> random lines mixing words, punctuation, whitespace and many scripts,
    /// plus random code points from assigned BMP blocks and astral symbol blocks.
    /// </summary>
    public static List<string> RandomLines(Random random, int lines)
    {
        var result = new List<string>(lines);
        var sb = new StringBuilder();
        for (int line = 0; line < lines; line++)
        {
            sb.Clear();
            int parts = random.Next(1, 30);
            for (int p = 0; p < parts; p++)
            {
                switch (random.Next(10))
                {
                    case < 4:
                        sb.Append(random.Next(3) == 0 ? "" : " ").Append(s_words[random.Next(s_words.Length)]);
                        break;
                    case < 8:
                        sb.Append(s_pieces[random.Next(s_pieces.Length)]);
                        break;
                    case 8:
                        sb.Append(RandomCodePoint(random));
                        break;
                    default:
                        sb.Append(random.Next(100000).ToString(System.Globalization.CultureInfo.InvariantCulture));
                        break;
                }
            }
            result.Add(sb.ToString());
        }
        return result;
    }

    /// <summary>Lines of the packaged fortune files (Debian's fortunes-min), if installed; empty otherwise.</summary>
    public static List<string> FortuneLines(int maxLines)
    {
        const string dir = "/usr/share/games/fortunes";
        var lines = new List<string>();
        if (!Directory.Exists(dir))
        {
            return lines;
        }
        foreach (var file in Directory.GetFiles(dir).Where(f => Path.GetExtension(f) is "").Order(StringComparer.Ordinal))
        {
            lines.AddRange(File.ReadLines(file));
        }
        return lines.Count > maxLines ? lines.GetRange(0, maxLines) : lines;
    }

    private static string RandomCodePoint(Random random)
    {
        // Blocks assigned since Unicode 6 or earlier, so every library's tables agree on them. Astral
        // blocks are symbols only: Microsoft.ML's regex pre-tokenizers see UTF-16 code units, so a letter
        // or digit outside the BMP (𝔘, 𠀀) counts as punctuation there and joins differently with its
        // neighbours than in GPT-2 and Hugging Face, which see code points.
        (int From, int To)[] blocks =
        [
            (0x00A0, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0590, 0x05FF), (0x0600, 0x06FF),
            (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2190, 0x22FF),
            (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF),
            (0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6C5),
        ];
        var (from, to) = blocks[random.Next(blocks.Length)];
        int codePoint = random.Next(from, to + 1);
        return char.ConvertFromUtf32(codePoint);
    }
}
