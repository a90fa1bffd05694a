using FrugalLM.IO;
using FrugalLM.Planning;
using FrugalLM.Tokenization;
using FrugalLM.Training;
using Spectre.Console;

namespace FrugalLM.Cli;

/// <summary>Exit codes of <c>frugal</c>.</summary>
internal static class ExitCodes
{
    public const int Ok = 0;
    public const int Failure = 1;
    public const int BadInput = 2;
    public const int DoesNotFit = 3;
}

/// <summary>Runs a command body and turns the errors a user can cause into a message and an exit code.</summary>
internal static class CliRunner
{
    /// <summary>True when stdout is a terminal (progress bars); false when piped or redirected (plain lines).</summary>
    public static bool Interactive => !Console.IsOutputRedirected && !Console.IsErrorRedirected;

    public static int Run(Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (e is CheckpointFormatException or ModelConfigException or PlanException or TokenizerException or DataException or ArgumentException or Distributed.BackendUnavailableException or FileNotFoundException or DirectoryNotFoundException)
        {
            Error(e.Message);
            return ExitCodes.BadInput;
        }
        catch (BudgetException e)
        {
            Error(e.Message);
            return ExitCodes.DoesNotFit;
        }
        catch (OperationCanceledException)
        {
            Error("cancelled");
            return ExitCodes.Failure;
        }
    }

    public static void Error(string message) => Console.Error.WriteLine($"error: {message}");

    /// <summary>
    /// True on the ranks other than 0 of a distributed run: status lines are dropped so each appears once (errors still
    /// print, from every rank).
    /// </summary>
    public static bool Quiet { get; set; }

    /// <summary>A status line on stderr, so stdout carries only the command's product.</summary>
    public static void Status(string message)
    {
        if (Quiet)
        {
            return;
        }
        if (Interactive)
        {
            AnsiConsole.Console.Profile.Out.Writer.Flush();
        }
        Console.Error.WriteLine(message);
    }
}
