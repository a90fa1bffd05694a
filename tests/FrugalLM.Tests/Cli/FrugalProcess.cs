using System.Diagnostics;

namespace FrugalLM.Tests.Cli;

/// <summary>Runs the real <c>frugal</c> executable (built next to the tests) as a child process.</summary>
internal static class FrugalProcess
{
    public static (int Exit, string Out, string Err) Run(params string[] args) => RunWith(new Dictionary<string, string>(), args);

    /// <summary>Runs <c>frugal</c> with extra environment variables.</summary>
    public static (int Exit, string Out, string Err) RunWith(IReadOnlyDictionary<string, string> environment, params string[] args)
    {
        using var process = Start(environment, args);
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
    public static Process Start(params string[] args) => Start(new Dictionary<string, string>(), args);

    /// <summary>
    /// Runs <c>frugal</c> until <paramref name="file"/> exists (then kills its whole process tree) or it ends by itself,
    /// at most 3 minutes: a crash at a chosen point of a run.
    /// </summary>
    public static void RunUntilFileExists(string file, params string[] args)
    {
        using var process = Start(args);
        process.BeginOutputReadLine(); // drained, so the child never blocks on a full pipe
        process.BeginErrorReadLine();
        var deadline = DateTime.UtcNow.AddMinutes(3);
        while (!File.Exists(file) && !process.HasExited && DateTime.UtcNow < deadline)
        {
            Thread.Sleep(50);
        }
        if (!process.HasExited)
        {
            process.Kill(entireProcessTree: true);
        }
        process.WaitForExit();
    }

    private static Process Start(IReadOnlyDictionary<string, string> environment, string[] args)
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
        foreach (var (name, value) in environment)
        {
            start.Environment[name] = value;
        }
        return Process.Start(start)!;
    }

    /// <summary>The bundled default model.</summary>
    public static string BundledModel => Path.Combine(TestSupport.RepoRoot, "models", "frugal-kjv-17m");
}
