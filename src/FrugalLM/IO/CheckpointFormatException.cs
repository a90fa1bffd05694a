namespace FrugalLM.IO;

/// <summary>
/// A model file is unusable: truncated, with a header that lies, or not matching the model. The message
/// names the file and, where one is involved, the tensor and both shapes. The CLI maps it to exit code 2.
/// </summary>
public sealed class CheckpointFormatException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CheckpointFormatException(string file, string message, Exception? inner = null)
        : base($"{file}: {message}", inner)
    {
        File = file;
    }

    /// <summary>The offending file.</summary>
    public string File { get; }
}
