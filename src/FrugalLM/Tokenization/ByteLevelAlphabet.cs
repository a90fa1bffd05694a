namespace FrugalLM.Tokenization;

/// <summary>
/// GPT-2's reversible map from bytes to printable characters (<c>bytes_to_unicode</c> in OpenAI's
/// encoder.py and in Hugging Face's ByteLevel pre-tokenizer). Byte-level BPE vocabularies store every
/// token as these characters, so a vocabulary built from raw bytes must be spelled with them.
/// </summary>
internal static class ByteLevelAlphabet
{
    private static readonly char[] s_byteToChar = Build();

    /// <summary>Spells a byte sequence in the byte-level alphabet, one character per byte.</summary>
    public static string Encode(ReadOnlySpan<byte> bytes)
    {
        return string.Create(bytes.Length, bytes.ToArray(), static (chars, source) =>
        {
            for (int i = 0; i < source.Length; i++)
            {
                chars[i] = s_byteToChar[source[i]];
            }
        });
    }

    private static char[] Build()
    {
        // Printable Latin-1 bytes keep their own code point; the 68 others (controls, space, DEL,
        // NBSP, soft hyphen) are given U+0100 onwards in byte order.
        var map = new char[256];
        int next = 256;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char)b : (char)next++;
        }
        return map;
    }
}
