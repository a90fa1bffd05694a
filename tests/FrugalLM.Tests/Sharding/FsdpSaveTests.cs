using FrugalLM.Distributed;
using FrugalLM.IO;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Sharding;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Sharding;

/// <summary>
/// The streaming full-model save under FSDP (<see cref="HfCheckpoint.SaveStreamed"/> over
/// <see cref="ShardedModel.FullStateStream"/>): the same bytes as the ordinary save of the gathered state, one flat vector
/// fetched at a time, and the ranks that do not write fetch the same vectors in the same order. The 2-rank save is compared
/// with consolidation and with 1-rank runs in FsdpCheckpointTests and FsdpLaunchTests.
/// </summary>
public sealed class FsdpSaveTests
{
    public FsdpSaveTests() => TestSupport.Init();

    // 40 kB files split the tiny model into several files, with flat vectors (a layer's matrices) across file boundaries.
    [Theory]
    [InlineData(false, 2L << 30, ScalarType.Float32)]
    [InlineData(true, 2L << 30, ScalarType.BFloat16)]
    [InlineData(false, 40_000L, ScalarType.Float32)]
    [InlineData(true, 40_000L, ScalarType.Float16)]
    public void StreamingSaveWritesTheSameBytesAsSavingTheGatheredState(bool tied, long maxShardBytes, ScalarType dtype)
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig(tied));
        model.InitializeWeights(seed: 7, std: 0.2);
        using var collectives = new SingleProcessCollectives();
        using var sharded = Fsdp.Wrap(model, collectives, ShardingStrategy.FullShard);
        using var expected = TestSupport.TempDir();
        using var streamed = TestSupport.TempDir();

        var state = sharded.CollectFullState();
        try
        {
            HfCheckpoint.Save(model, expected.Path, dtype, maxShardBytes: maxShardBytes, sources: state);
        }
        finally
        {
            state.ForEach(s => s.Value.Dispose());
        }

        var stream = sharded.FullStateStream();
        var fetched = new List<string>();
        var recording = stream with
        {
            Fetch = (group, use) =>
            {
                fetched.Add(group);
                stream.Fetch(group, use);
            },
        };
        HfCheckpoint.SaveStreamed(model, streamed.Path, recording, dtype, maxShardBytes: maxShardBytes);

        var files = Directory.EnumerateFiles(expected.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList();
        Assert.Equal(files, Directory.EnumerateFiles(streamed.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList());
        Assert.Equal(maxShardBytes < 100_000, files.Contains(HfCheckpoint.IndexFile));
        foreach (var file in files)
        {
            Assert.True(File.ReadAllBytes(Path.Combine(expected.Path, file!)).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(streamed.Path, file!))), $"{file} differs");
        }

        // Every vector is fetched (once per file it reaches into), and a rank that does not write
        // fetches exactly the same sequence, so the gathers pair up across ranks.
        var vectors = stream.Tensors.Select(t => t.Group).Distinct().ToList();
        Assert.Equal(vectors.Order(StringComparer.Ordinal), fetched.Distinct().Order(StringComparer.Ordinal));
        Assert.Equal(maxShardBytes < 100_000, fetched.Count > vectors.Count);
        var replayed = new List<string>();
        HfCheckpoint.FetchStream(model, stream with { Fetch = (group, use) => replayed.Add(group) }, dtype, maxShardBytes);
        Assert.Equal(fetched, replayed);
    }
}
