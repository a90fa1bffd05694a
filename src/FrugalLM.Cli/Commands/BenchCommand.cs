using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.Cli.Bench;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Native;
using FrugalLM.Planning;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>frugal bench</c>: every technique measured in its own process (peak resident set, tokens/s, the
/// estimator's prediction of the same plan), and where PyTorch has the configuration, the peer
/// (<c>tools/peer_bench.py</c>) run alternately with ours on the same model, data sizes, seed and threads.
/// <c>frugal bench-case</c> is the child it launches; <c>frugal bench int8-kernels</c> (<see cref="BenchInt8Command"/>) times the int8 kernel alone.
/// </summary>
internal static class BenchCommand
{
    private static readonly JsonSerializerOptions Json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        WriteIndented = true,
    };

    public static Command Create()
    {
        var quick = new Option<bool>("--quick") { Description = "One configuration per technique family on the bundled model, 2 timed steps (a few minutes)" };
        var models = new Option<string>("--models") { Description = "Comma-separated: bundled (frugal-kjv-17m), 100m (models/configs/llama-100m.json), or config.json paths", DefaultValueFactory = _ => "bundled,100m" };
        var peer = new Option<string>("--peer") { Description = "pytorch (tools/peer_bench.py with Debian's python3-torch) or none", DefaultValueFactory = _ => "pytorch" };
        var python = new Option<string>("--python") { Description = "Interpreter with torch for the peer", DefaultValueFactory = _ => "/usr/bin/python3" };
        var output = new Option<string>("--out") { Description = "Folder for results.json, results.md and the PNGs", DefaultValueFactory = _ => "runs/bench" };
        var work = new Option<string>("--work") { Description = "Folder for the random-weight models and the runs' logs", DefaultValueFactory = _ => "runs/bench-work" };
        var steps = new Option<int?>("--steps") { Description = "Timed steps per configuration (default 3; 2 with --quick)" };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first", DefaultValueFactory = _ => 1 };
        var repeat = new Option<int>("--repeat") { Description = "Runs per configuration and runtime, alternating ours/peer then peer/ours", DefaultValueFactory = _ => 1 };
        var threads = new Option<int?>("--threads") { Description = "CPU threads of both runtimes (default: all cores)" };
        var only = new Option<string?>("--only") { Description = "Only configurations whose label contains this text (e.g. 'int8' or 'llama-100m')" };
        var device = DeviceOption.Create();
        var command = new Command("bench", "Measure memory (predicted vs measured) and speed of every technique, side by side with PyTorch")
        {
            quick, models, peer, python, output, work, steps, warmup, repeat, threads, only, device,
        };
        command.Subcommands.Add(BenchInt8Command.Create());
        command.SetAction(pr => CliRunner.Run(() =>
        {
            DeviceOption.Require(pr.GetValue(device));
            var root = RepositoryRoot();
            int threadCount = pr.GetValue(threads) ?? Environment.ProcessorCount;
            var chosen = pr.GetValue(models)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(m => ResolveModel(m, root)).ToList();
            bool isQuick = pr.GetValue(quick);
            int timed = pr.GetValue(steps) ?? (isQuick ? 2 : 3);
            int runs = pr.GetValue(repeat);
            if (timed < 1 || pr.GetValue(warmup) < 0 || runs < 1 || threadCount < 1)
            {
                throw new ArgumentException("--steps, --repeat and --threads must be at least 1 and --warmup at least 0");
            }
            var workFolder = pr.GetValue(work)!;
            var outFolder = pr.GetValue(output)!;
            Directory.CreateDirectory(outFolder);
            var prepared = (isQuick ? chosen.Take(1) : chosen).Select(m => (m, PrepareWeights(m, workFolder))).ToList();
            var cases = BenchMatrix.Cases(prepared, isQuick, timed, pr.GetValue(warmup), threadCount)
                .Where(c => pr.GetValue(only) is not { } text || $"{c.Model} {c.Technique}".Contains(text, StringComparison.OrdinalIgnoreCase))
                .ToList();
            if (cases.Count == 0)
            {
                throw new ArgumentException("no configuration matches --only");
            }
            var peerRunner = pr.GetValue(peer) switch
            {
                "none" => null,
                "pytorch" => PeerRunner.TryCreate(pr.GetValue(python)!, Path.Combine(root, "tools", "peer_bench.py")),
                var other => throw new ArgumentException($"--peer must be pytorch or none (got '{other}')"),
            };
            if (pr.GetValue(peer) == "pytorch" && peerRunner is null)
            {
                CliRunner.Status($"peer: {PeerRunner.LastProblem}; measuring FrugalLM alone");
            }
            var logs = Path.Combine(workFolder, "logs");
            Directory.CreateDirectory(logs);
            var results = new List<BenchResult>();
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < cases.Count; i++)
            {
                var c = cases[i];
                var log = Path.Combine(logs, $"{i:D2}-{Slug(c.Model + " " + c.Technique)}.log");
                var result = RunCase(c, peerRunner, runs, log);
                results.Add(result);
                CliRunner.Status(string.Create(CultureInfo.InvariantCulture, $"[{i + 1}/{cases.Count} {clock.Elapsed:mm\\:ss}] {c.Model}, {c.Technique}: {Summary(result)}"));
                Write(outFolder, results, pr.Tokens.Skip(1).Select(t => t.Value), peerRunner);
            }
            var markdown = BenchReport.Markdown(results);
            Console.Out.Write(markdown);
            foreach (var png in BenchReport.Pictures(results, outFolder))
            {
                CliRunner.Status($"wrote {png}");
            }
            CliRunner.Status($"wrote {Path.Combine(outFolder, "results.json")} and results.md in {clock.Elapsed.TotalMinutes:F1} min");
            return results.Any(r => r.Error is not null) ? ExitCodes.Failure : ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>The hidden child: runs one case given as JSON and prints its measurement as one JSON line.</summary>
    public static Command CreateChild()
    {
        var spec = new Option<string>("--case") { Description = "The case, as JSON", Required = true };
        var command = new Command("bench-case", "Run one bench configuration in this process (launched by frugal bench)") { spec };
        command.Hidden = true;
        command.SetAction(pr => CliRunner.Run(() =>
        {
            var c = JsonSerializer.Deserialize<BenchCase>(pr.GetValue(spec)!, Json) ?? throw new ArgumentException("--case: empty JSON");
            var (measurement, estimate) = BenchChild.Run(c);
            long baseline = estimate.Plan.Overhead.RuntimeBaselineBytes;
            var line = new JsonObject
            {
                ["measurement"] = JsonSerializer.SerializeToNode(measurement, Json),
                ["predicted_bytes"] = estimate.DeviceBytes - baseline,
                ["predicted_components"] = JsonSerializer.SerializeToNode(
                    estimate.Components.Where(k => k.Tier == MemoryTier.Device && k.Key != "runtime_baseline")
                        .GroupBy(k => k.Key).ToDictionary(g => g.Key, g => g.Sum(k => k.Bytes)), Json),
            };
            // Under mpirun only rank 0 answers: the parent reads the last JSON line, and ranks are alike.
            if (Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_RANK") is null or "0")
            {
                Console.Out.WriteLine(line.ToJsonString());
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static BenchResult RunCase(BenchCase c, PeerRunner? peer, int runs, string log)
    {
        var ours = new List<BenchMeasurement>();
        var theirs = new List<BenchMeasurement>();
        long predicted = 0;
        Dictionary<string, long> components = [];
        string? error = null, peerNote = null;
        bool withPeer = peer is not null && c.PeerHas;
        for (int r = 0; r < runs; r++)
        {
            // ABBA: ours then the peer, then the peer then ours, so drift of the machine cancels in pairs.
            var order = r % 2 == 0 ? new[] { true, false } : [false, true];
            foreach (bool mine in order)
            {
                if (mine)
                {
                    // Several ranks run as one job of frugal launch (mpirun), each a bench-case child.
                    string[] child = ["bench-case", "--case", JsonSerializer.Serialize(c, Json)];
                    var (json, problem) = ChildProcess.RunJson(OwnCommand(), c.Ranks > 1 ? ["launch", "-n", c.Ranks.ToString(CultureInfo.InvariantCulture), "--", .. child] : child, log);
                    if (json is null)
                    {
                        error = problem;
                        continue;
                    }
                    ours.Add(json["measurement"].Deserialize<BenchMeasurement>(Json)!);
                    predicted = json["predicted_bytes"]!.GetValue<long>();
                    components = json["predicted_components"].Deserialize<Dictionary<string, long>>(Json)!;
                }
                else if (withPeer)
                {
                    var (measurement, problem) = peer!.Run(c, log);
                    if (measurement is null)
                    {
                        peerNote = problem;
                        continue;
                    }
                    theirs.Add(measurement);
                }
            }
        }
        return new BenchResult
        {
            Case = c,
            PredictedBytes = predicted,
            PredictedComponents = components,
            Ours = ours,
            Peer = theirs,
            PeerNote = peerNote,
            Error = error,
        };
    }

    private static string Summary(BenchResult r)
    {
        var ours = BenchReport.Best(r.Ours);
        if (ours is null)
        {
            return $"failed: {r.Error}";
        }
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"peak {MemoryProbe.Mib(ours.PeakAboveBaseline)} above baseline (predicted {MemoryProbe.Mib(r.PredictedBytes)}), ");
        text.Append(ours.TokensPerSecond is double t
            ? string.Create(CultureInfo.InvariantCulture, $"{t:F0} tok/s")
            : string.Create(CultureInfo.InvariantCulture, $"prefill {ours.PrefillTokensPerSecond:F0} tok/s, decode {ours.DecodeTokensPerSecond:F1} tok/s"));
        if (BenchReport.Best(r.Peer) is { } p)
        {
            text.Append(CultureInfo.InvariantCulture, $" | pytorch: peak {MemoryProbe.Mib(p.PeakAboveBaseline)}, {p.TokensPerSecond ?? p.DecodeTokensPerSecond:F1} tok/s");
        }
        else if (r.PeerNote is not null)
        {
            text.Append($" | pytorch failed: {r.PeerNote}");
        }
        return text.ToString();
    }

    private static void Write(string folder, IReadOnlyList<BenchResult> results, IEnumerable<string> arguments, PeerRunner? peer)
    {
        AtomicFile.Write(Path.Combine(folder, "results.json"), s => JsonSerializer.Serialize(s, results, Json));
        // The runs' processes chose oneMKL's dispatch; this one decides it the same way once libtorch is loaded.
        FrugalLM.Native.TorchRuntime.Initialize();
        var header = new StringBuilder();
        header.AppendLine("# frugal bench results");
        header.AppendLine();
        header.AppendLine(CultureInfo.InvariantCulture, $"- command: `./frugal bench {string.Join(' ', arguments)}`");
        header.AppendLine(CultureInfo.InvariantCulture, $"- machine: {Machine()}");
        header.AppendLine(CultureInfo.InvariantCulture, $"- FrugalLM on .NET {Environment.Version}, TorchSharp {typeof(TorchSharp.torch).Assembly.GetName().Version} (oneMKL: {FrugalLM.Native.MklDispatch.Status}); peer: {peer?.Version ?? "none"}");
        header.AppendLine(CultureInfo.InvariantCulture, $"- date: {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        header.AppendLine();
        header.Append(BenchReport.Markdown(results));
        AtomicFile.Write(Path.Combine(folder, "results.md"), s => s.Write(Encoding.UTF8.GetBytes(header.ToString())));
    }

    // The random-weight model of a config, written once (fp32) and reused while the config is unchanged, so
    // every configuration loads its weights from an HF folder the way a user's run does.
    private static string PrepareWeights(BenchMatrix.BenchModel model, string work)
    {
        var folder = Path.Combine(work, "models", model.Name);
        var source = File.ReadAllText(model.Config);
        var stamp = Path.Combine(folder, "bench-source-config.json");
        if (File.Exists(Path.Combine(folder, HfCheckpoint.SingleFile)) && File.Exists(stamp) && File.ReadAllText(stamp) == source)
        {
            return folder;
        }
        CliRunner.Status($"bench: writing random weights for {model.Name} (seed 0) to {folder}");
        TorchRuntime.Initialize();
        using (var lm = CausalLM.Create(ModelSpec.Load(model.Config)))
        {
            lm.InitializeWeights(seed: 0);
            HfCheckpoint.Save(lm, folder, TorchSharp.torch.ScalarType.Float32);
        }
        AtomicFile.Write(stamp, s => s.Write(Encoding.UTF8.GetBytes(source)));
        return folder;
    }

    private static BenchMatrix.BenchModel ResolveModel(string name, string root) => name switch
    {
        "bundled" => new("frugal-kjv-17m", Path.Combine(root, "models", "frugal-kjv-17m", "config.json"), 4, 256),
        "100m" => new("llama-100m", Path.Combine(root, "models", "configs", "llama-100m.json"), 2, 512),
        _ when File.Exists(name) => new(Path.GetFileNameWithoutExtension(name), Path.GetFullPath(name), 2, 512),
        _ => throw new ArgumentException($"--models: '{name}' is neither bundled, 100m nor a config.json file"),
    };

    // The checkout this command was built from: the bench needs its models/ and tools/.
    private static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "tools", "peer_bench.py")) && Directory.Exists(Path.Combine(dir.FullName, "models")))
            {
                return dir.FullName;
            }
        }
        return Directory.GetCurrentDirectory();
    }

    private static (string File, string[] Prefix) OwnCommand()
    {
        var process = Environment.ProcessPath ?? "dotnet";
        var dll = typeof(BenchCommand).Assembly.Location;
        return Path.GetFileNameWithoutExtension(process) == "dotnet" ? (process, [dll]) : (process, []);
    }

    private static string Slug(string text) =>
        new string(text.Select(ch => char.IsAsciiLetterOrDigit(ch) ? char.ToLowerInvariant(ch) : '-').ToArray()).Replace("--", "-").Trim('-');

    /// <summary>The machine line of every bench report: CPU, logical CPUs, RAM, operating system.</summary>
    internal static string Machine() =>
        $"{CpuName()}, {Environment.ProcessorCount} logical CPUs, {MemoryProbe.Mib(TotalMemory())} RAM; {System.Runtime.InteropServices.RuntimeInformation.OSDescription}";

    /// <summary>The CPU's model name from /proc/cpuinfo.</summary>
    internal static string CpuName() =>
        File.Exists("/proc/cpuinfo")
            ? File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? "unknown CPU"
            : "unknown CPU";

    private static long TotalMemory() =>
        File.Exists("/proc/meminfo")
            ? long.Parse(File.ReadLines("/proc/meminfo").First().Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024
            : 0;
}

/// <summary>Runs a child process, appends its output to a log, and returns the last JSON line of its stdout.</summary>
internal static class ChildProcess
{
    private static readonly TimeSpan Limit = TimeSpan.FromMinutes(30);

    public static (JsonNode? Json, string? Problem) RunJson((string File, string[] Prefix) command, IEnumerable<string> arguments, string log)
    {
        var start = new ProcessStartInfo(command.File)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        // With TERM set, ranks under mpirun prefix their output with terminal escapes (ESC[?1h ESC=) and the JSON line
        // would not start with '{'.
        start.Environment.Remove("TERM");
        foreach (var a in command.Prefix.Concat(arguments))
        {
            start.ArgumentList.Add(a);
        }
        using var process = Process.Start(start) ?? throw new InvalidOperationException($"cannot start {command.File}");
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEndAsync();
        if (!process.WaitForExit(Limit))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
        }
        File.AppendAllText(log, $"$ {command.File} {string.Join(' ', start.ArgumentList)}\n{stdout.Result}{stderr.Result}exit {process.ExitCode}\n\n");
        var last = stdout.Result.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).LastOrDefault(l => l.StartsWith('{'));
        if (process.ExitCode != 0 || last is null)
        {
            var reason = stderr.Result.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).LastOrDefault() ?? "no output";
            return (null, $"exit {process.ExitCode}: {reason} (log: {log})");
        }
        return (JsonNode.Parse(last), null);
    }
}

/// <summary>The PyTorch peer, <c>tools/peer_bench.py</c>, run with an interpreter that has torch.</summary>
internal sealed class PeerRunner
{
    private readonly string python;
    private readonly string script;

    private PeerRunner(string python, string script, string version)
    {
        this.python = python;
        this.script = script;
        Version = version;
    }

    /// <summary>Why the last <see cref="TryCreate"/> failed.</summary>
    public static string LastProblem { get; private set; } = "";

    /// <summary>"PyTorch 1.13.1" or similar.</summary>
    public string Version { get; }

    public static PeerRunner? TryCreate(string python, string script)
    {
        if (!File.Exists(script))
        {
            LastProblem = $"{script} not found";
            return null;
        }
        try
        {
            using var process = Process.Start(new ProcessStartInfo(python, ["-c", "import torch; print(torch.__version__)"])
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            })!;
            var version = process.StandardOutput.ReadToEnd().Trim();
            process.StandardError.ReadToEnd();
            process.WaitForExit();
            if (process.ExitCode != 0)
            {
                LastProblem = $"{python} cannot import torch (apt-get install python3-torch libopenblas0-pthread)";
                return null;
            }
            return new PeerRunner(python, script, $"PyTorch {version} ({python})");
        }
        catch (System.ComponentModel.Win32Exception)
        {
            LastProblem = $"{python} not found (apt-get install python3-torch libopenblas0-pthread)";
            return null;
        }
    }

    public (BenchMeasurement? Measurement, string? Problem) Run(BenchCase c, string log)
    {
        var (json, problem) = ChildProcess.RunJson((python, [script]), c.PeerArguments(), log);
        if (json is null)
        {
            return (null, problem);
        }
        double? Number(string key) => json[key] is JsonValue v ? v.GetValue<double>() : null;
        return (new BenchMeasurement
        {
            Runtime = "pytorch",
            BaselineBytes = json["baseline_rss_bytes"]!.GetValue<long>(),
            PeakBytes = json["peak_rss_bytes"]!.GetValue<long>(),
            TokensPerSecond = Number("tokens_per_second"),
            PrefillTokensPerSecond = Number("prefill_tokens_per_second"),
            DecodeTokensPerSecond = Number("decode_tokens_per_second"),
            StepSeconds = json["step_seconds"]?.AsArray().Select(s => s!.GetValue<double>()).ToList() ?? [],
            LossFirst = Number("loss_first"),
            LossLast = Number("loss_last"),
            Parameters = json["parameters"]?.GetValue<long>() ?? 0,
            TrainableParameters = json["trainable_parameters"]?.GetValue<long>() ?? 0,
        }, null);
    }
}
