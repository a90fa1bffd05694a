using System.Globalization;
using System.Text;

namespace FrugalLM.Lora;

/// <summary>
/// Writes JSON byte for byte as Python's <c>json.dumps(obj, indent=2, sort_keys=True)</c> does (PEFT writes
/// adapter_config.json that way): two-space indents, ", " replaced by line breaks, ": " after keys, keys
/// sorted, ASCII only (\uXXXX escapes), floats as Python's repr (0.0, 0.05, 1e-05), no trailing newline.
/// Values are null, bool, int, long, double, string, lists and string-keyed dictionaries.
/// </summary>
internal static class PythonJson
{
    public static string Dumps(object? value)
    {
        var builder = new StringBuilder();
        Write(builder, value, 0);
        return builder.ToString();
    }

    private static void Write(StringBuilder b, object? value, int depth)
    {
        switch (value)
        {
            case null:
                b.Append("null");
                break;
            case bool flag:
                b.Append(flag ? "true" : "false");
                break;
            case int or long:
                b.Append(Convert.ToInt64(value, CultureInfo.InvariantCulture).ToString(CultureInfo.InvariantCulture));
                break;
            case double number:
                b.Append(Float(number));
                break;
            case string text:
                String(b, text);
                break;
            case IEnumerable<KeyValuePair<string, object?>> dictionary:
                var entries = dictionary.OrderBy(e => e.Key, StringComparer.Ordinal).ToList();
                if (entries.Count == 0)
                {
                    b.Append("{}");
                    break;
                }
                b.Append('{');
                for (int i = 0; i < entries.Count; i++)
                {
                    b.Append(i == 0 ? "\n" : ",\n").Append(' ', 2 * (depth + 1));
                    String(b, entries[i].Key);
                    b.Append(": ");
                    Write(b, entries[i].Value, depth + 1);
                }
                b.Append('\n').Append(' ', 2 * depth).Append('}');
                break;
            case System.Collections.IEnumerable list:
                var items = list.Cast<object?>().ToList();
                if (items.Count == 0)
                {
                    b.Append("[]");
                    break;
                }
                b.Append('[');
                for (int i = 0; i < items.Count; i++)
                {
                    b.Append(i == 0 ? "\n" : ",\n").Append(' ', 2 * (depth + 1));
                    Write(b, items[i], depth + 1);
                }
                b.Append('\n').Append(' ', 2 * depth).Append(']');
                break;
            default:
                throw new ArgumentException($"cannot write a {value.GetType().Name} as JSON", nameof(value));
        }
    }

    /// <summary>Python's float repr: shortest round-trip digits, ".0" on integral values, "e-05" exponents.</summary>
    public static string Float(double value)
    {
        if (!double.IsFinite(value))
        {
            return double.IsNaN(value) ? "NaN" : value > 0 ? "Infinity" : "-Infinity";
        }
        if (value == Math.Floor(value) && Math.Abs(value) < 1e16)
        {
            return value.ToString("F1", CultureInfo.InvariantCulture);
        }
        return value.ToString("R", CultureInfo.InvariantCulture).Replace('E', 'e');
    }

    private static void String(StringBuilder b, string text)
    {
        b.Append('"');
        foreach (char c in text)
        {
            switch (c)
            {
                case '"': b.Append("\\\""); break;
                case '\\': b.Append("\\\\"); break;
                case '\n': b.Append("\\n"); break;
                case '\r': b.Append("\\r"); break;
                case '\t': b.Append("\\t"); break;
                case '\b': b.Append("\\b"); break;
                case '\f': b.Append("\\f"); break;
                default:
                    if (c < 0x20 || c > 0x7e)
                    {
                        b.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    }
                    else
                    {
                        b.Append(c);
                    }
                    break;
            }
        }
        b.Append('"');
    }
}
