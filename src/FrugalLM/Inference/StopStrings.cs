namespace FrugalLM.Inference;

/// <summary>
/// Cuts generated text at the first stop string and tells a streaming caller how much of the text is safe
/// to show: a tail that could still grow into a stop string is held back until it cannot.
/// </summary>
public sealed class StopStrings(IReadOnlyList<string> stops)
{
    private readonly string[] stops = stops.Where(s => s.Length > 0).ToArray();

    /// <summary>
    /// Examines the text generated so far. Returns the prefix that may be shown, and whether a stop string
    /// occurred (then the prefix ends just before it).
    /// </summary>
    public (string Visible, bool Stopped) Check(string text)
    {
        int first = -1;
        foreach (var stop in stops)
        {
            int at = text.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && (first < 0 || at < first))
            {
                first = at;
            }
        }
        if (first >= 0)
        {
            return (text[..first], true);
        }
        int hold = 0;
        foreach (var stop in stops)
        {
            for (int n = Math.Min(stop.Length - 1, text.Length); n > hold; n--)
            {
                if (text.AsSpan(text.Length - n).SequenceEqual(stop.AsSpan(0, n)))
                {
                    hold = n;
                    break;
                }
            }
        }
        return (text[..^hold], false);
    }
}
