using System.CommandLine;
using System.Diagnostics;
using System.Globalization;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>frugal launch -n N -- &lt;subcommand&gt; [args]</c>: runs N ranks of this same <c>frugal</c> under OpenMPI's
/// <c>mpirun</c>, which they detect (<see cref="Distributed.Collectives.Create"/>). It waits for <c>mpirun</c> and
/// returns its exit code (the first failing rank's). Equivalent by hand:
/// <c>OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -n N --oversubscribe --bind-to none -x OMP_NUM_THREADS dotnet frugal.dll ...</c>.
/// </summary>
internal static class LaunchCommand
{
    public static Command Create()
    {
        var ranks = new Option<int>("--ranks", "-n") { Description = "Number of processes (ranks)", Required = true };
        var arguments = new Argument<string[]>("command")
        {
            Description = "The frugal subcommand and its arguments, after --",
            Arity = ArgumentArity.OneOrMore,
        };
        var command = new Command("launch", "Run a frugal subcommand as N cooperating processes under OpenMPI's mpirun (frugal launch -n 2 -- train ...)")
        {
            ranks, arguments,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            int n = pr.GetValue(ranks);
            if (n < 1)
            {
                throw new ArgumentException($"--ranks must be at least 1 (got {n})");
            }
            var forwarded = pr.GetValue(arguments) ?? [];
            if (forwarded.Length == 0 || forwarded[0] == "launch")
            {
                throw new ArgumentException("launch needs a frugal subcommand other than launch after --, e.g. frugal launch -n 2 -- train ...");
            }
            var mpirun = FindOnPath("mpirun")
                ?? throw new ArgumentException("mpirun not found: install openmpi-bin (apt-get install openmpi-bin, or run tools/setup.sh)");
            var start = new ProcessStartInfo(mpirun) { UseShellExecute = false };
            foreach (var a in MpirunArguments(n, Environment.ProcessorCount))
            {
                start.ArgumentList.Add(a);
            }
            var (file, prefix) = OwnCommand();
            start.ArgumentList.Add(file);
            foreach (var a in prefix.Concat(forwarded))
            {
                start.ArgumentList.Add(a);
            }
            // mpirun refuses to run as root unless told twice; containers and CI run as root.
            if (Environment.IsPrivilegedProcess)
            {
                start.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
                start.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
            }
            // Ranks share the cores: libtorch's default of one thread per core in every rank would oversubscribe them.
            if (!start.Environment.ContainsKey("OMP_NUM_THREADS"))
            {
                start.Environment["OMP_NUM_THREADS"] = Math.Max(1, Environment.ProcessorCount / n).ToString(CultureInfo.InvariantCulture);
            }
            // Ctrl-C reaches mpirun too (same process group); it stops the ranks, and we wait to forward its exit code.
            ConsoleCancelEventHandler keepWaiting = (_, e) => e.Cancel = true;
            Console.CancelKeyPress += keepWaiting;
            try
            {
                using var process = Process.Start(start) ?? throw new InvalidOperationException($"cannot start {mpirun}");
                process.WaitForExit();
                return process.ExitCode;
            }
            finally
            {
                Console.CancelKeyPress -= keepWaiting;
            }
        }));
        return command;
    }

    /// <summary>
    /// mpirun's options: <c>--oversubscribe</c> when there are more ranks than cores (it refuses otherwise), and no
    /// core binding, since each rank runs several libtorch threads that binding would pin to one core.
    /// </summary>
    internal static List<string> MpirunArguments(int ranks, int cores)
    {
        var list = new List<string> { "-n", ranks.ToString(CultureInfo.InvariantCulture) };
        if (ranks > cores)
        {
            list.Add("--oversubscribe");
        }
        list.AddRange(["--bind-to", "none", "-x", "OMP_NUM_THREADS"]);
        return list;
    }

    private static string? FindOnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(dir => Path.Combine(dir, name))
            .FirstOrDefault(File.Exists);

    /// <summary>This frugal: <c>dotnet frugal.dll</c> when run through dotnet, else the apphost itself.</summary>
    private static (string File, string[] Prefix) OwnCommand()
    {
        var process = Environment.ProcessPath ?? "dotnet";
        var dll = typeof(LaunchCommand).Assembly.Location;
        return Path.GetFileNameWithoutExtension(process) == "dotnet" ? (process, [dll]) : (process, []);
    }
}
