using System.Diagnostics;

namespace FrugalLM.Tests.Cli;

/// <summary>Runs the real <c>frugal</c> executable (built next to the tests) as a child process.</summary>
internal static class FrugalProcess
{
    public static (int Exit, string Out, string Err) Run(params string[] args)
    {
        using var process = Start(args);
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromMinutes(5)))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException("frugal " + string.Join(' ', args) + " did not finish in 5 minutes");
        }
        return (process.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Starts <c>frugal</c> with redirected output (the caller reads or ignores it).</summary>
    public static Process Start(params string[] args)
    {
        var start = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "frugal.dll"));
        foreach (var a in args)
        {
            start.ArgumentList.Add(a);
        }
        start.Environment.Remove("TERM");
        return Process.Start(start)!;
    }

    /// <summary>The bundled default model.</summary>
    public static string BundledModel => Path.Combine(TestSupport.RepoRoot, "models", "frugal-kjv-17m");
}
