namespace FrugalLM.Tokenization;

/// <summary>
/// A tokenizer folder or file is missing, unreadable or inconsistent. The message names the folder or file
/// and what was expected there.
/// </summary>
public sealed class TokenizerException : Exception
{
    /// <summary>Creates the exception with a message that names the file and what was expected.</summary>
    public TokenizerException(string message) : base(message)
    {
    }

    /// <summary>Creates the exception with a message and the error that caused it.</summary>
    public TokenizerException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
