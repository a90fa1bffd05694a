using System.CommandLine;

namespace FrugalLM.Cli;

/// <summary>The list of <c>frugal</c> subcommands; each comes from its own file under Commands/.</summary>
internal static class CommandCatalog
{
    public static IEnumerable<Command> All()
    {
        yield return Commands.GenerateCommand.Create();
        yield return Commands.TrainCommand.Create();
        yield return Commands.EvalCommand.Create();
        yield return Commands.MergeCommand.Create();
        yield return Commands.QuantizeCommand.Create();
        yield return Commands.EstimateCommand.Create();
        yield return Commands.PlanCommand.Create();
        yield return Commands.BenchCommand.Create();
        yield return Commands.BenchCommand.CreateChild();
        yield return Commands.LaunchCommand.Create();
        yield return Commands.CollectivesSelfTestCommand.Create();
        yield return Commands.CheckpointCommand.Create();
    }
}
